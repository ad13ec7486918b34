// Cornerstone3D 5.14: the adapters' SR and SEG readers, with Cornerstone's own metadata.
//
// REAL: @cornerstonejs/adapters@5.14.0
//   adaptersSR.Cornerstone3D.MeasurementReport.generateToolState (SR -> tool annotations; the
//   function OHIF's hydrateStructuredReport calls), adaptersSEG.Cornerstone3D.Segmentation
//   .createFromDICOMSegBuffer (SEG -> labelmap images);
//   @cornerstonejs/metadata@5.14.0 registerDefaultProviders + utilities.addDicomPart10Instance
//   (Cornerstone's metadata modules, e.g. imagePlaneModule, computed from the CT files);
//   @cornerstonejs/core@5.14.0 (image cache, imageToWorldCoords, sortImageIdsAndGetSpacing).
// What an application supplies (done here, as a Cornerstone app would): the imageIds of the
// source images ("wadouri:file://..."), and for the SR the map "SOPInstanceUID:frame" -> imageId.

import { pathToFileURL } from 'node:url';
import dcmjs from 'dcmjs';
import { require, packageVersion } from './setup.mjs';
import { naturalize, plain } from './dicom.mjs';
import { describeSegments } from './segments.mjs';

const csCore = await import('@cornerstonejs/core');
const csMetadata = await import('@cornerstonejs/metadata');
const adapters = await import('@cornerstonejs/adapters');

const { MeasurementReport } = adapters.adaptersSR.Cornerstone3D;
const { Segmentation } = adapters.adaptersSEG.Cornerstone3D;

export const versions = {
  '@cornerstonejs/adapters': packageVersion('@cornerstonejs/adapters'),
  '@cornerstonejs/core': packageVersion('@cornerstonejs/core'),
  '@cornerstonejs/metadata': packageVersion('@cornerstonejs/metadata'),
  dcmjs: packageVersion('dcmjs'),
};

let stackPromise = null;

/**
 * Registers Cornerstone's default metadata providers (after removing any left by the OHIF
 * sections, which share the registry) and the source images. Returns the images' imageIds in
 * stack order and their SOPInstanceUIDs.
 */
function getStack(inputs) {
  stackPromise ??= (async () => {
    csCore.metaData.removeAllProviders();
    csMetadata.registerDefaultProviders();
    const imageIds = [];
    for (const image of inputs.images) {
      const imageId = `wadouri:${pathToFileURL(image.file).href}`;
      await csMetadata.utilities.addDicomPart10Instance(imageId, image.buffer);
      imageIds.push(imageId);
    }
    const { sortedImageIds } = csCore.utilities.sortImageIdsAndGetSpacing(imageIds);
    const sopInstanceUIDs = sortedImageIds.map(
      (imageId) => csCore.metaData.get('sopCommonModule', imageId)?.sopInstanceUID,
    );
    return { imageIds: sortedImageIds, sopInstanceUIDs };
  })();
  return stackPromise;
}

/** generateToolState on the SR: which tools it hydrates, on which image, with which points. */
export async function runCornerstoneSr(inputs, result) {
  const { imageIds, sopInstanceUIDs } = await getStack(inputs);
  const sopInstanceUIDToImageIdMap = {};
  imageIds.forEach((imageId, i) => {
    sopInstanceUIDToImageIdMap[`${sopInstanceUIDs[i]}:1`] = imageId;
  });
  const dataset = naturalize(inputs.sr.buffer);
  // Note: generateToolState catches each measurement group's error itself and only logs it
  // ("Unable to generate tool state for ..."): see this section's "log".
  const toolState = MeasurementReport.generateToolState(dataset, sopInstanceUIDToImageIdMap, csCore.metaData);
  result.tools = {};
  for (const [toolName, states] of Object.entries(toolState)) {
    result.tools[toolName] = states.map((state) => {
      const { annotation = {} } = state;
      const referencedImageId = annotation.metadata?.referencedImageId ?? null;
      const index = imageIds.indexOf(referencedImageId);
      return plain({
        TrackingUniqueIdentifier: state.TrackingUniqueIdentifier ?? null,
        referencedImageId,
        referencedSOPInstanceUID: state.sopInstanceUid ?? (index >= 0 ? sopInstanceUIDs[index] : null),
        FrameOfReferenceUID: annotation.metadata?.FrameOfReferenceUID ?? null,
        frameNumber: annotation.data?.frameNumber ?? null,
        points: annotation.data?.handles?.points ?? null,
        label: annotation.data?.label ?? null,
        description: state.description ?? null,
        finding: state.finding ? codeOf(state.finding) : null,
        findingSites: (state.findingSites || []).map(codeOf),
        cachedStats: annotation.data?.cachedStats ?? null,
      });
    });
  }
  // How the adapters classify each group (the lookups generateToolState and OHIF's
  // isRehydratable use), so a caller can see why a group was not hydrated.
  result.adapterLookup = describeAdapterLookup(dataset);
}

function codeOf(code) {
  const c = Array.isArray(code) ? code[0] : code;
  return c ? `${c.CodingSchemeDesignator}:${c.CodeValue} ${c.CodeMeaning}` : null;
}

function asArray(value) {
  if (value === undefined || value === null) return [];
  return Array.isArray(value) ? value : [value];
}

/** For each measurement group: its tracking identifier and the adapter each lookup finds. */
function describeAdapterLookup(dataset) {
  const root = asArray(dataset.ContentSequence);
  const imagingMeasurements = root.find((item) => item.ConceptNameCodeSequence?.CodeMeaning === 'Imaging Measurements');
  const groups = asArray(imagingMeasurements?.ContentSequence)
    .filter((item) => item.ConceptNameCodeSequence?.CodeMeaning === 'Measurement Group');
  return groups.map((group) => {
    const items = asArray(group.ContentSequence);
    const trackingIdentifier = items.find((item) => item.ConceptNameCodeSequence?.CodeMeaning === 'Tracking Identifier')?.TextValue ?? null;
    const entry = { trackingIdentifier, byTrackingIdentifier: null, byCodeType: null, byCodeTypeError: null };
    try {
      entry.byTrackingIdentifier = MeasurementReport.getAdapterForTrackingIdentifier(trackingIdentifier ?? '')?.toolType ?? null;
    } catch (error) {
      entry.byTrackingIdentifier = `error: ${error.message}`;
    }
    try {
      entry.byCodeType = MeasurementReport.getAdapterForCodeType(group)?.toolType ?? null;
    } catch (error) {
      entry.byCodeTypeError = `${error.name}: ${error.message}`;
    }
    return entry;
  });
}

/** createFromDICOMSegBuffer on the SEG: segments, their colors and voxel counts. */
export async function runCornerstoneSeg(inputs, result) {
  const { imageIds } = await getStack(inputs);
  const loaded = await Segmentation.createFromDICOMSegBuffer(imageIds, inputs.seg.buffer, {
    metadataProvider: csCore.metaData,
  });
  result.referencedImages = imageIds.length;
  result.overlappingSegments = loaded.overlappingSegments ?? null;
  // The adapters hand back RecommendedDisplayCIELabValue as stored; applications convert it
  // with dcmjs (as OHIF does): color = round(255 * dicomlab2RGB(value)).
  result.segments = describeSegments(loaded, (data) => (data.RecommendedDisplayCIELabValue
    ? dcmjs.data.Colors.dicomlab2RGB(data.RecommendedDisplayCIELabValue).map((v) => Math.round(255 * v))
    : null));
}
