// Reading Part 10 files the way OHIF's local-file route does
// (OHIF platform/app/src/routes/Local/dicomFileLoader.js getDataset():
//   dcmjs.data.DicomMessage.readFile -> DicomMetaDictionary.naturalizeDataset(dict),
//   dataset.url = dataset.imageId = imageId, dataset._meta = namifyDataset(meta)).

import fs from 'node:fs';
import path from 'node:path';
import dcmjs from 'dcmjs';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

/** An ArrayBuffer holding exactly the file's bytes. */
export function readArrayBuffer(file) {
  const bytes = fs.readFileSync(file);
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
}

/** The naturalized dataset of a Part 10 file (a fresh object on every call). */
export function naturalize(arrayBuffer) {
  const dicomData = DicomMessage.readFile(arrayBuffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dicomData.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(dicomData.meta);
  return dataset;
}

/** The .dcm files of a folder, sorted by name. */
export function listDicomFiles(dir) {
  const files = fs.readdirSync(dir)
    .filter((name) => name.toLowerCase().endsWith('.dcm'))
    .sort()
    .map((name) => path.join(dir, name));
  if (!files.length) throw new Error(`no .dcm files in ${dir}`);
  return files;
}

/** Reads every input once: {images: [{file, buffer}], sr: {file, buffer}|null, seg: ...|null}. */
export function readInputs({ images, sr, seg }) {
  const read = (file) => (file ? { file: path.resolve(file), buffer: readArrayBuffer(file) } : null);
  const results = new Set([sr, seg].filter(Boolean).map((file) => path.resolve(file)));
  return {
    // the SR/SEG themselves are skipped should they sit in the images folder
    images: listDicomFiles(images).filter((file) => !results.has(path.resolve(file))).map(read),
    sr: read(sr),
    seg: read(seg),
  };
}

/** JSON-friendly copy of a value: typed arrays and Float32 vectors become plain rounded arrays. */
export function plain(value, digits = 4) {
  const round = (n) => (typeof n === 'number' && Number.isFinite(n) ? Number(n.toFixed(digits)) : n);
  if (value === null || value === undefined) return value ?? null;
  if (ArrayBuffer.isView(value)) return Array.from(value, round);
  if (Array.isArray(value)) return value.map((v) => plain(v, digits));
  if (typeof value === 'number') return round(value);
  if (typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      if (typeof v !== 'function') out[k] = plain(v, digits);
    }
    return out;
  }
  return value;
}

/** "Name: message (at function @ package/file:line:col)": the message and the top stack frame. */
export function describeError(error) {
  if (!(error instanceof Error)) return String(error);
  const frame = (error.stack || '').split('\n').map((line) => line.trim()).find((line) => line.startsWith('at '));
  const text = `${error.name}: ${error.message}`;
  if (!frame) return text;
  const match = /^at (?:(.*?) \()?(.*?)\)?$/.exec(frame);
  const location = match[2].replace(/^.*node_modules\//, '');
  return `${text} (at ${match[1] ? `${match[1]} @ ` : ''}${location})`;
}
