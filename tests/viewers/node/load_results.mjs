#!/usr/bin/env node
// Loads an aidx SR (and SEG) with the viewers' own published loading code and prints one JSON
// object on stdout: what OHIF 3.13 and Cornerstone3D 5.14 make of the results.
//
//   node tests/viewers/node/load_results.mjs --images DIR --sr FILE [--seg FILE] [--verbose]
//
// DIR holds the source images (*.dcm). Sections: ohif_sr, cornerstone_sr, and with --seg
// ohif_seg, cornerstone_seg. Each runs on its own: a section that throws reports
// {"error": "message (at first stack frame)"} and the others still run. Every console message
// the viewer code printed during a section is in that section's "log" (the code catches and
// logs some of its own errors, e.g. generateToolState per measurement group). --verbose also
// copies those messages to stderr. Exit status: 0 when the JSON was written (whatever the
// sections found), 2 on bad arguments.
//
// See README.md in this folder for what is real and what is stubbed.

import { withLog } from './lib/setup.mjs'; // first: console capture, browser globals, stubs
import { parseArgs } from 'node:util';
import { readInputs, describeError, plain } from './lib/dicom.mjs';

function usage(message) {
  process.stderr.write(`${message}\nusage: node load_results.mjs --images DIR --sr FILE [--seg FILE] [--verbose]\n`);
  process.exit(2);
}

let args;
try {
  args = parseArgs({
    options: {
      images: { type: 'string' },
      sr: { type: 'string' },
      seg: { type: 'string' },
      verbose: { type: 'boolean', default: false },
    },
  }).values;
} catch (error) {
  usage(error.message);
}
if (!args.images || !args.sr) usage('--images and --sr are required');

/**
 * Runs one section: body(result) fills `result`; an exception becomes result.error. Modules are
 * imported inside the section so that one package failing to load spoils only its sections.
 */
async function section(body) {
  const result = { error: null };
  const log = [];
  const started = Date.now();
  await withLog(log, async () => {
    try {
      await body(result);
    } catch (error) {
      result.error = describeError(error);
    }
  });
  if (result.hydrate?.error) result.hydrate.error = describeError(result.hydrate.error);
  result.ms = Date.now() - started;
  result.log = log;
  return result;
}

const output = { inputs: { images: args.images, sr: args.sr, seg: args.seg ?? null } };
let inputs;
try {
  inputs = readInputs(args);
  output.inputs.imageCount = inputs.images.length;
} catch (error) {
  output.error = describeError(error);
  process.stdout.write(`${JSON.stringify(output)}\n`);
  process.exit(0);
}

// OHIF first: it registers OHIF's metadata provider; the Cornerstone sections then clear the
// shared metadata registry and register Cornerstone's own providers.
output.ohif_sr = await section(async (r) => {
  const ohif = await import('./lib/ohif.mjs');
  r.versions = ohif.versions;
  await ohif.runOhifSr(inputs, r);
});
if (inputs.seg) {
  output.ohif_seg = await section(async (r) => {
    const ohif = await import('./lib/ohif.mjs');
    r.versions = ohif.versions;
    await ohif.runOhifSeg(inputs, r);
  });
}
output.cornerstone_sr = await section(async (r) => {
  const cs = await import('./lib/cornerstone.mjs');
  r.versions = cs.versions;
  await cs.runCornerstoneSr(inputs, r);
});
if (inputs.seg) {
  output.cornerstone_seg = await section(async (r) => {
    const cs = await import('./lib/cornerstone.mjs');
    r.versions = cs.versions;
    await cs.runCornerstoneSeg(inputs, r);
  });
}

process.stdout.write(`${JSON.stringify(plain(output))}\n`);
// Cornerstone/OHIF leave timers and listeners behind; the work is done.
process.exit(0);
