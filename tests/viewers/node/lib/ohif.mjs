// OHIF 3.13: the SR and SEG SOP class handlers of the published extensions, run inside a
// minimal OHIF "app". What is real and what is stubbed:
//
// REAL (from npm, unmodified):
//   @ohif/extension-cornerstone-dicom-sr@3.13.13  getSopClassHandlerModule -> displaySet.load()
//       (parses the TID 1500 measurement groups, attaches them to image display sets, adds the
//       DICOMSRDisplay annotations), hydrateStructuredReport
//   @ohif/extension-cornerstone-dicom-seg@3.13.2 (3.13.13 is not published) getSopClassHandlerModule
//       -> displaySet.load() (adapters' createFromDicomSegImageId: SEG frames -> labelmaps)
//   @ohif/core@3.13.13  DicomMetadataStore, DisplaySetService, MeasurementService,
//       classes.MetadataProvider (OHIF's Cornerstone metadata provider), ImageSet, utils
//   the Cornerstone packages the extensions pin (5.6.8, nested by npm under each extension)
// STUBBED (the surroundings):
//   - the local data source (modelled on OHIF's DicomLocalDataSource: imageId = "dicomfile:N",
//     "&frame=N" for frames), the extension manager, commands manager, customizationService
//     (defaults only), uiNotificationService (records), segmentationService (records the call;
//     the real one, in @ohif/extension-cornerstone, builds Cornerstone rendering state);
//   - the image (stack) display set of the CT series: built like extension-default's stack
//     SOP class handler does (ImageSet of the instances), since extension-default is not loaded;
//   - the measurementService mappings that @ohif/extension-cornerstone registers: same source
//     name/version and the same annotation types, with stand-in mapping functions;
//   - an image loader for the SEG's "dicomfile:N&frame=F" ids (OHIF uses
//     @cornerstonejs/dicom-image-loader, which needs web workers): it returns the frame's
//     pixels unpacked to one byte per pixel, as that loader does for 1-bit data.
// Nothing is rendered: the SR code path adds annotations to Cornerstone's annotation state
// (no viewport, no canvas), which needs no stub.

import { createRequire } from 'node:module';
import {
  require, packageVersion, CORNERSTONE_3D_TOOLS_SOURCE_NAME, CORNERSTONE_3D_TOOLS_SOURCE_VERSION,
} from './setup.mjs';
import { naturalize, plain, describeError } from './dicom.mjs';
import { describeSegments } from './segments.mjs';

const OHIF = require('@ohif/core');
const srExtensionModule = require('@ohif/extension-cornerstone-dicom-sr');
const segExtensionModule = require('@ohif/extension-cornerstone-dicom-seg');

// The Cornerstone copies the extensions actually call (their own pinned 5.6.8 versions).
const fromSr = createRequire(require.resolve('@ohif/extension-cornerstone-dicom-sr'));
const fromSeg = createRequire(require.resolve('@ohif/extension-cornerstone-dicom-seg'));
const srCore = fromSr('@cornerstonejs/core');
const srTools = fromSr('@cornerstonejs/tools');
const segCore = fromSeg('@cornerstonejs/core');

const { DicomMetadataStore, DisplaySetService, MeasurementService, classes, utils } = OHIF;
const { MetadataProvider, ImageSet } = classes;

export const versions = {
  '@ohif/core': packageVersion('@ohif/core'),
  '@ohif/extension-cornerstone-dicom-sr': packageVersion('@ohif/extension-cornerstone-dicom-sr'),
  '@ohif/extension-cornerstone-dicom-seg': packageVersion('@ohif/extension-cornerstone-dicom-seg'),
  'adapters used by the SR extension': packageVersion('@cornerstonejs/adapters', fromSr),
  'adapters used by the SEG extension': packageVersion('@cornerstonejs/adapters', fromSeg),
};

// Annotation types whose mappings @ohif/extension-cornerstone@3.13.13 registers on the
// Cornerstone3DTools@0.1 source (dist/ohif-extension-cornerstone.umd.js, addMapping(y,"Length",...)).
// isRehydratable and hydrateStructuredReport only consider SR measurements of these types.
const OHIF_CORNERSTONE_ANNOTATION_TYPES = [
  'Length', 'Crosshairs', 'Bidirectional', 'EllipticalROI', 'CircleROI', 'ArrowAnnotate',
  'CobbAngle', 'Angle', 'RectangleROI', 'PlanarFreehandROI', 'SplineROI', 'CalibrationLine',
  'LivewireContour', 'Probe', 'UltrasoundDirectionalTool', 'UltrasoundPleuraBLineTool',
  'SegmentBidirectional',
];

const SR_EXTENSION_ID = '@ohif/extension-cornerstone-dicom-sr';
const SEG_EXTENSION_ID = '@ohif/extension-cornerstone-dicom-seg';
const STACK_HANDLER_ID = '@ohif/extension-default.sopClassHandlerModule.stack';
const NOT_SUPPORTED_HANDLER_ID = '@ohif/extension-default.sopClassHandlerModule.not-supported-display-sets-handler';

let metadataRegistered = false;

/** Registers OHIF's metadata provider the way @ohif/extension-cornerstone's init does. */
function registerOhifMetadataProvider() {
  if (metadataRegistered) return;
  metadataRegistered = true;
  // All core copies share one @cornerstonejs/metadata registry; register once, with the
  // priorities used by extension-cornerstone (MetadataProvider 9999, generic 9998).
  srCore.metaData.addProvider(MetadataProvider.get.bind(MetadataProvider), 9999);
  for (const core of new Set([srCore, segCore])) {
    core.metaData.addProvider(core.utilities.genericMetadataProvider.get, 9998);
  }
}

let appPromise = null;

/**
 * The OHIF session shared by the SR and SEG sections (as when a user opens the study): all
 * inputs loaded, display sets made. Built once; a failure is reported by both sections.
 */
function getApp(inputs) {
  appPromise ??= (async () => {
    const app = createApp(inputs);
    // The SR extension's preRegistration registers its display tools (DICOMSRDisplay, SRLength...).
    try {
      app.srExtension.preRegistration({ servicesManager: app.managers.servicesManager, configuration: {} });
    } catch (error) {
      app.records.preRegistrationError = error;
    }
    app.displaySets = makeDisplaySets(app, inputs);
    return app;
  })();
  return appPromise;
}

/**
 * Loads all inputs into OHIF's DicomMetadataStore as OHIF's local-file route does and builds the
 * services. Returns the app (services, data source, records) and the stored instances.
 */
function createApp(inputs) {
  registerOhifMetadataProvider();
  const records = { notifications: [], segmentationServiceCalls: [] };

  // --- instances: dicomFileLoader.getDataset + DicomMetadataStore.addInstance ----------------
  const all = [...inputs.images, inputs.sr, inputs.seg].filter(Boolean);
  const inputErrors = new Map(); // a file that cannot be parsed spoils only the sections using it
  const stored = [];
  all.forEach((input, index) => {
    let dataset;
    try {
      dataset = naturalize(input.buffer);
    } catch (error) {
      inputErrors.set(input, error);
      return;
    }
    const imageId = `dicomfile:${index}`;
    dataset.url = imageId;
    dataset.imageId = imageId;
    DicomMetadataStore.addInstance(dataset);
    const instance = DicomMetadataStore.getInstance(
      dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID,
    );
    // DicomLocalDataSource retrieve.series.metadata: map the imageId to the instance's UIDs.
    MetadataProvider.addImageIdToUIDs(imageId, {
      StudyInstanceUID: instance.StudyInstanceUID,
      SeriesInstanceUID: instance.SeriesInstanceUID,
      SOPInstanceUID: instance.SOPInstanceUID,
    });
    instance.imageId = imageId;
    stored.push({ input, instance });
  });

  // --- data source (DicomLocalDataSource-like) ------------------------------------------------
  const dataSource = {
    getImageIdsForInstance({ instance, frame }) {
      const storedInstance = DicomMetadataStore.getInstance(
        instance.StudyInstanceUID, instance.SeriesInstanceUID, instance.SOPInstanceUID,
      );
      let imageId = storedInstance.url;
      if (frame !== undefined) imageId += `&frame=${frame}`;
      return imageId;
    },
    getImageIdsForDisplaySet(displaySet) {
      const imageIds = [];
      for (const instance of displaySet.images || []) {
        if (instance.NumberOfFrames > 1) {
          for (let frame = 1; frame <= instance.NumberOfFrames; frame++) {
            imageIds.push(this.getImageIdsForInstance({ instance, frame }));
          }
        } else {
          imageIds.push(this.getImageIdsForInstance({ instance }));
        }
      }
      return imageIds;
    },
    retrieve: {
      bulkDataURI: async ({ BulkDataURI }) => {
        throw new Error(`no bulk data source for ${BulkDataURI} (Part 10 files carry inline data)`);
      },
    },
  };

  // --- services --------------------------------------------------------------------------------
  const displaySetService = new DisplaySetService();
  const measurementService = new MeasurementService();
  const source = measurementService.createSource(
    CORNERSTONE_3D_TOOLS_SOURCE_NAME, CORNERSTONE_3D_TOOLS_SOURCE_VERSION,
  );
  // Stand-ins for extension-cornerstone's mapping functions: keep what hydration produced.
  const toMeasurement = ({ annotation }) => ({
    uid: annotation.annotationUID,
    toolName: annotation.metadata?.toolName,
    referencedImageId: annotation.metadata?.referencedImageId,
    FrameOfReferenceUID: annotation.metadata?.FrameOfReferenceUID,
    label: annotation.data?.label,
    points: annotation.data?.handles?.points,
    frameNumber: annotation.data?.frameNumber,
    cachedStats: annotation.data?.cachedStats,
  });
  for (const annotationType of OHIF_CORNERSTONE_ANNOTATION_TYPES) {
    measurementService.addMapping(source, annotationType, [], () => ({}), toMeasurement);
  }
  const customizations = { codingValues: {} }; // extension-default's default for codingValues
  const services = {
    displaySetService,
    measurementService,
    customizationService: { getCustomization: (id) => customizations[id] },
    uiNotificationService: { show: (notification) => records.notifications.push(plain(notification)) },
    segmentationService: {
      EVENTS: { SEGMENT_LOADING_COMPLETE: 'event::segment_loading_complete' },
      _broadcastEvent: () => undefined, // loading progress, for the UI
      createSegmentationForSEGDisplaySet: async (displaySet) => {
        records.segmentationServiceCalls.push(displaySet.displaySetInstanceUID);
        return displaySet.displaySetInstanceUID;
      },
    },
  };
  const servicesManager = { services };
  const moduleEntries = {};
  const extensionManager = {
    getModuleEntry: (id) => moduleEntries[id],
    getDataSources: () => [dataSource],
    getActiveDataSource: () => [dataSource],
  };
  // hydrateStructuredReport runs "updateMeasurement" (panel/UI state) for each measurement.
  const commandsManager = { runCommand: () => undefined };
  const managers = { servicesManager, extensionManager, commandsManager };

  // --- SOP class handlers ----------------------------------------------------------------------
  const srExtension = srExtensionModule.default;
  const segExtension = segExtensionModule.default;
  for (const [extensionId, extension] of [[SR_EXTENSION_ID, srExtension], [SEG_EXTENSION_ID, segExtension]]) {
    for (const handler of extension.getSopClassHandlerModule(managers)) {
      moduleEntries[`${extensionId}.sopClassHandlerModule.${handler.name}`] = handler;
    }
  }
  moduleEntries[STACK_HANDLER_ID] = { sopClassUids: [], getDisplaySetsFromSeries: makeStackDisplaySets };
  moduleEntries[NOT_SUPPORTED_HANDLER_ID] = { getDisplaySetsFromSeries: () => [] };
  // Handlers are matched by SOP class; the stack stub takes the images' SOP class(es).
  displaySetService.init(extensionManager, [
    `${SEG_EXTENSION_ID}.sopClassHandlerModule.dicom-seg`,
    `${SR_EXTENSION_ID}.sopClassHandlerModule.dicom-sr`,
    `${SR_EXTENSION_ID}.sopClassHandlerModule.dicom-sr-3d`,
    STACK_HANDLER_ID,
  ]);
  const imageSopClassUids = new Set(stored.filter((s) => inputs.images.includes(s.input))
    .map((s) => s.instance.SOPClassUID));
  moduleEntries[STACK_HANDLER_ID].sopClassUids = [...imageSopClassUids];

  return { stored, inputErrors, dataSource, services, managers, records, srExtension, srExtensionModule };
}

/**
 * The image display set of a series, as extension-default's stack handler builds it
 * (an ImageSet of the instances with display-set attributes), sorted by InstanceNumber.
 */
function makeStackDisplaySets(instances) {
  const imageSet = new ImageSet(instances);
  const first = instances[0];
  imageSet.setAttributes({
    displaySetInstanceUID: imageSet.uid,
    StudyInstanceUID: first.StudyInstanceUID,
    SeriesInstanceUID: first.SeriesInstanceUID,
    SeriesNumber: first.SeriesNumber || 0,
    SeriesDescription: first.SeriesDescription,
    SOPClassUID: first.SOPClassUID,
    Modality: first.Modality,
    FrameOfReferenceUID: first.FrameOfReferenceUID,
    SOPClassHandlerId: STACK_HANDLER_ID,
    isMultiFrame: false,
    numImageFrames: instances.length,
    isReconstructable: utils.isDisplaySetReconstructable(instances)?.value ?? false,
    label: first.SeriesDescription || '',
  });
  imageSet.sortBy((a, b) => (Number(a.InstanceNumber) || 0) - (Number(b.InstanceNumber) || 0));
  return [imageSet];
}

/** Makes display sets series by series, images first (DicomLocalDataSource sorts SR/SEG last). */
function makeDisplaySets(app, inputs) {
  const { displaySetService } = app.services;
  const bySeries = new Map();
  const order = (s) => (s.input === inputs.sr || s.input === inputs.seg ? 1 : 0);
  for (const s of [...app.stored].sort((a, b) => order(a) - order(b))) {
    const uid = s.instance.SeriesInstanceUID;
    if (!bySeries.has(uid)) bySeries.set(uid, []);
    bySeries.get(uid).push(s.instance);
  }
  // One series failing (e.g. the SEG handler throwing) must not stop the others.
  const made = [];
  app.displaySetErrors = {};
  for (const instances of bySeries.values()) {
    try {
      made.push(...(displaySetService.makeDisplaySets(instances) || []));
    } catch (error) {
      app.displaySetErrors[instances[0].Modality] = error;
    }
  }
  return made;
}

function imageDisplaySets(app) {
  return app.services.displaySetService.getActiveDisplaySets()
    .filter((ds) => ds.SOPClassHandlerId === STACK_HANDLER_ID);
}

// ---------------------------------------------------------------------------------------------
// SR

/** What OHIF 3.13 makes of the SR: display set, parsed measurements, which ones load on images. */
export async function runOhifSr(inputs, result) {
  const app = await getApp(inputs);
  const { displaySets } = app;
  const images = imageDisplaySets(app);
  result.imageDisplaySets = images.map((ds) => ({
    SeriesInstanceUID: ds.SeriesInstanceUID, images: ds.images.length,
  }));
  const srDisplaySets = displaySets.filter((ds) => ds.Modality === 'SR');
  result.displaySets = srDisplaySets.length;
  if (app.records.preRegistrationError) result.preRegistrationError = describeError(app.records.preRegistrationError);
  if (app.inputErrors.has(inputs.sr)) throw app.inputErrors.get(inputs.sr);
  if (app.displaySetErrors.SR) throw app.displaySetErrors.SR;
  if (!srDisplaySets.length) throw new Error('the SR SOP class handler made no display set');
  const srDisplaySet = srDisplaySets[0];
  result.SOPClassHandlerId = srDisplaySet.SOPClassHandlerId;
  result.isImagingMeasurementReport = srDisplaySet.isImagingMeasurementReport;

  // load(): parse the content tree, then try to attach each measurement to the image display
  // sets already present (the step OHIF calls _checkIfCanAddMeasurementsToDisplaySet). If it
  // throws, what it had parsed before is still reported.
  try {
    await srDisplaySet.load();
  } finally {
    result.isRehydratable = srDisplaySet.isRehydratable ?? null;
    result.referencedImages = plain(srDisplaySet.referencedImages);
    result.measurements = (srDisplaySet.measurements || []).map((m) => describeSrMeasurement(m));
  }

  // What "make editable" (hydrateStructuredReport) would turn into Cornerstone measurements.
  // OHIF only offers it when isRehydratable is true.
  result.hydrate = null;
  if (srDisplaySet.isRehydratable) {
    result.hydrate = { error: null, measurements: [] };
    try {
      const out = app.srExtensionModule.hydrateStructuredReport(app.managers, srDisplaySet.displaySetInstanceUID);
      result.hydrate.result = plain(out);
      result.hydrate.measurements = app.services.measurementService.getMeasurements().map((m) => plain({
        toolName: m.toolName,
        label: m.label,
        referencedImageId: m.referencedImageId,
        SOPInstanceUID: referencedSop(app, m.referencedImageId),
        FrameOfReferenceUID: m.FrameOfReferenceUID,
        points: m.points,
        finding: m.finding,
        findingSites: m.findingSites,
      }));
    } catch (error) {
      result.hydrate.error = error;
    }
  }
  result.notifications = app.records.notifications;
}

function referencedSop(app, imageId) {
  if (!imageId) return null;
  return MetadataProvider.getUIDsFromImageID(imageId)?.SOPInstanceUID ?? null;
}

function describeSrMeasurement(m) {
  // For a loaded measurement: the DICOMSRDisplay annotation OHIF added (what it draws on the
  // image): world coordinates of the first coord's points, and its label.
  const annotation = m.loaded ? srTools.annotation.state.getAnnotation(m.TrackingUniqueIdentifier) : null;
  return plain({
    TrackingUniqueIdentifier: m.TrackingUniqueIdentifier,
    TrackingIdentifier: m.TrackingIdentifier,
    labels: m.labels,
    loaded: m.loaded,
    ReferencedSOPInstanceUID: m.ReferencedSOPInstanceUID ?? null,
    frameNumber: m.frameNumber ?? null,
    graphicType: m.graphicType ?? m.coords?.[0]?.GraphicType ?? null,
    graphicCode: m.graphicCode ?? null, // set only for a SCOORD at group level
    points: annotation?.data?.handles?.points ?? null,
    annotationLabel: annotation?.data?.label ?? null,
    annotationTool: annotation?.metadata?.toolName ?? null,
    // The parsed coordinates, one per SCOORD OHIF took (group level, or one per NUM).
    coords: (m.coords || []).map((c) => ({
      ValueType: c.ValueType,
      GraphicType: c.GraphicType,
      GraphicData: c.GraphicData,
      ReferencedSOPInstanceUID: c.ReferencedSOPSequence?.ReferencedSOPInstanceUID ?? null,
      ReferencedFrameOfReferenceUID: c.ReferencedFrameOfReferenceSequence ?? null,
    })),
  });
}

// ---------------------------------------------------------------------------------------------
// SEG

let segLoaderRegistered = false;
const segFrameSources = new Map(); // "dicomfile:N" -> {multiframe info, packed pixel data}

/**
 * Image loader for the SEG frames (stands in for @cornerstonejs/dicom-image-loader's
 * "dicomfile" scheme): returns frame F of an uncompressed SEG, one value per pixel.
 */
function registerSegFrameLoader() {
  if (segLoaderRegistered) return;
  segLoaderRegistered = true;
  segCore.imageLoader.registerImageLoader('dicomfile', (imageId) => ({
    promise: (async () => {
      const [base, query = ''] = imageId.split('&');
      const frame = Number(/frame=(\d+)/.exec(query)?.[1] ?? 1);
      const src = segFrameSources.get(base);
      if (!src) throw new Error(`harness image loader: no pixel data for ${imageId}`);
      const { rows, columns, bitsAllocated, pixelData } = src;
      const n = rows * columns;
      let pixels;
      if (bitsAllocated === 1) { // bit-packed across the whole pixel data, frames not byte-aligned
        pixels = new Uint8Array(n);
        const offset = (frame - 1) * n;
        for (let i = 0; i < n; i++) {
          const bit = offset + i;
          pixels[i] = (pixelData[bit >> 3] >> (bit & 7)) & 1;
        }
      } else if (bitsAllocated === 8) {
        pixels = pixelData.slice((frame - 1) * n, frame * n);
      } else {
        const words = new Uint16Array(pixelData.buffer, pixelData.byteOffset, pixelData.byteLength / 2);
        pixels = words.slice((frame - 1) * n, frame * n);
      }
      return {
        imageId, rows, columns, width: columns, height: rows, numberOfComponents: 1,
        getPixelData: () => pixels, imageFrame: { pixelData: pixels },
      };
    })(),
  }));
}

/** What OHIF 3.13 makes of the SEG: display set, segments, voxels per segment. */
export async function runOhifSeg(inputs, result) {
  registerSegFrameLoader();
  const app = await getApp(inputs);
  if (app.inputErrors.has(inputs.seg)) throw app.inputErrors.get(inputs.seg);
  const { displaySets } = app;
  const segDisplaySet = displaySets.find((ds) => ds.Modality === 'SEG');
  result.displaySets = displaySets.filter((ds) => ds.Modality === 'SEG').length;
  if (app.displaySetErrors.SEG) throw app.displaySetErrors.SEG;
  if (!segDisplaySet) throw new Error('the SEG SOP class handler made no display set');
  result.referencedDisplaySetFound = Boolean(segDisplaySet.referencedDisplaySetInstanceUID);

  // Pixel data for the harness's image loader (see registerSegFrameLoader).
  const { instance } = app.stored.find((s) => s.input === inputs.seg);
  if (instance._meta?.TransferSyntaxUID?.Value?.[0]?.startsWith('1.2.840.10008.1.2.4')
    || instance._meta?.TransferSyntaxUID?.Value?.[0] === '1.2.840.10008.1.2.5') {
    throw new Error('harness image loader: compressed SEG pixel data is not supported');
  }
  const pixelData = Array.isArray(instance.PixelData) ? instance.PixelData[0] : instance.PixelData;
  segFrameSources.set(instance.url, {
    rows: instance.Rows,
    columns: instance.Columns,
    bitsAllocated: instance.BitsAllocated,
    pixelData: new Uint8Array(pixelData),
  });

  await segDisplaySet.load({ headers: {} });

  result.referencedImages = segDisplaySet.referencedImageIds?.length ?? 0;
  result.overlappingSegments = segDisplaySet.overlappingSegments ?? null;
  result.segments = describeSegments(segDisplaySet, (data) => data.rgba);
  result.segmentationServiceCalled = app.records.segmentationServiceCalls.length > 0;
  result.notifications = app.records.notifications;
}
