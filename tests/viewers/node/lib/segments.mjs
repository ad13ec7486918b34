// Summary of a labelmap result, shared by both SEG sections.

import { plain } from './dicom.mjs';

/**
 * Segments of a loaded labelmap result ({segMetadata, labelMapImages, centroids}) from either
 * reader: label, color, voxel count (labelmap values equal to the segment number), centroid.
 */
export function describeSegments(loaded, colorOf) {
  const counts = new Map();
  for (const layer of loaded.labelMapImages || []) {
    for (const image of layer) {
      const values = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
      for (let i = 0; i < values.length; i++) {
        if (values[i]) counts.set(values[i], (counts.get(values[i]) || 0) + 1);
      }
    }
  }
  const segments = [];
  (loaded.segMetadata?.data || []).forEach((data, segmentNumber) => {
    if (!data || segmentNumber === 0) return;
    const centroid = loaded.centroids?.get?.(segmentNumber);
    segments.push(plain({
      segmentNumber,
      label: data.SegmentLabel ?? null,
      color: colorOf(data) ?? null,
      RecommendedDisplayCIELabValue: data.RecommendedDisplayCIELabValue ?? null,
      voxels: counts.get(segmentNumber) || 0,
      centroid: centroid ? [centroid.world.x, centroid.world.y, centroid.world.z] : null,
      trackingUID: data.TrackingUID ?? null,
      trackingID: data.TrackingID ?? null,
      category: data.SegmentedPropertyCategoryCodeSequence?.CodeMeaning ?? null,
      type: data.SegmentedPropertyTypeCodeSequence?.CodeMeaning ?? null,
    }, 3));
  });
  return segments;
}
