// Process-wide setup that must run before any viewer package is loaded.
//
// 1. Console capture. The viewers' code logs a lot (and catches some of its own errors,
//    logging them as warnings). Every console call is recorded in the log of the section
//    that is running, so nothing goes silently missing, and nothing reaches stdout, which
//    carries only the one JSON object. loglevel (used by Cornerstone) binds console methods
//    when a logger is created, so the console must be replaced before the packages load.
// 2. Browser globals. @ohif/core's bundle includes Mousetrap and other browser code that
//    touches window/document/self at load time; jsdom supplies them. Nothing is rendered.
// 3. Module stubs for OHIF packages the two extensions import but whose code is not on the
//    loading path (UI, React contexts, i18n), or which are not published for 3.13.13.

import fs from 'node:fs';
import path from 'node:path';
import Module, { createRequire } from 'node:module';
import { inspect } from 'node:util';
import { JSDOM } from 'jsdom';

// ---- 1. console capture -------------------------------------------------------------------

let currentLog = null; // the array of the section that is running, or null
const verbose = process.argv.includes('--verbose');
const MAX_LOG_ENTRIES = 200;

// One line per console call: errors as "Name: message", objects shallowly (their full dumps
// are huge SR content trees), each argument cut to ARG_CHARS.
const ARG_CHARS = 300;
function formatArg(arg) {
  if (arg instanceof Error) return `${arg.name}: ${arg.message}`;
  const text = typeof arg === 'string' ? arg
    : inspect(arg, { depth: 1, breakLength: Infinity }).replace(/\s*\n\s*/g, ' ');
  return text.length > ARG_CHARS ? `${text.slice(0, ARG_CHARS)}…` : text;
}

for (const level of ['log', 'info', 'debug', 'warn', 'error', 'trace']) {
  console[level] = (...args) => {
    let text;
    try {
      text = args.map(formatArg).join(' ');
    } catch {
      text = String(args[0]);
    }
    if (verbose) process.stderr.write(`[${level}] ${text}\n`);
    if (!currentLog || level === 'debug' || level === 'trace') return;
    if (currentLog.length < MAX_LOG_ENTRIES) currentLog.push(`${level}: ${text}`);
  };
}

/** Runs fn with console output recorded into `log` (an array). */
export async function withLog(log, fn) {
  const previous = currentLog;
  currentLog = log;
  try {
    return await fn();
  } finally {
    currentLog = previous;
  }
}

// ---- 2. browser globals -------------------------------------------------------------------

const dom = new JSDOM('<!doctype html><html><body></body></html>', { pretendToBeVisual: true });
globalThis.window = dom.window;
globalThis.self = dom.window;
globalThis.document = dom.window.document;
// Events must be jsdom's: Cornerstone dispatches CustomEvents on DOM targets.
globalThis.Event = dom.window.Event;
globalThis.CustomEvent = dom.window.CustomEvent;
const domNames = Object.getOwnPropertyNames(dom.window).filter((name) => /^(HTML|SVG)\w*Element$/.test(name));
for (const name of [...domNames, 'Element', 'Node', 'Document', 'navigator',
  'requestAnimationFrame', 'cancelAnimationFrame', 'localStorage', 'sessionStorage']) {
  if (!(name in globalThis)) {
    try {
      globalThis[name] = dom.window[name];
    } catch {
      // some getters (navigator in newer Node) are read-only: keep Node's own
    }
  }
}

// ---- 3. module stubs ----------------------------------------------------------------------

// Values copied from @ohif/extension-cornerstone@3.13.13 (dist/ohif-extension-cornerstone.umd.js:
// V="Cornerstone3DTools",N="0.1",H={CORNERSTONE_3D_TOOLS_SOURCE_NAME:V,CORNERSTONE_3D_TOOLS_SOURCE_VERSION:N}).
// That extension (the viewport/rendering layer, 930 kB + vtk/wasm) is not loaded; the SR and
// SEG extensions only read these two enums from it outside their React components.
export const CORNERSTONE_3D_TOOLS_SOURCE_NAME = 'Cornerstone3DTools';
export const CORNERSTONE_3D_TOOLS_SOURCE_VERSION = '0.1';

const noop = () => undefined;
const STUBS = {
  '@ohif/extension-cornerstone': {
    Enums: { CORNERSTONE_3D_TOOLS_SOURCE_NAME, CORNERSTONE_3D_TOOLS_SOURCE_VERSION },
    usePositionPresentationStore: noop, // used only by the SR viewport component
  },
  '@ohif/extension-default': {}, // used only by SEG panels
  '@ohif/i18n': { t: (s) => s }, // display-set labels only ("Series 3 - SR")
  '@ohif/ui-next': {}, // viewport and panel components only
  '@ohif/core/src/contextProviders/SystemProvider': { useSystem: noop }, // React context only
};

const originalLoad = Module._load;
Module._load = function load(request, parent, isMain) {
  if (Object.hasOwn(STUBS, request)) return STUBS[request];
  return originalLoad.call(this, request, parent, isMain);
};

/** require() relative to this harness (node_modules of tests/viewers/node). */
export const require = createRequire(import.meta.url);

/** The installed version of package `name` as seen from `req` (a require function). */
export function packageVersion(name, req = require) {
  let dir = path.dirname(req.resolve(name));
  for (;;) {
    const file = path.join(dir, 'package.json');
    if (fs.existsSync(file)) {
      const pkg = JSON.parse(fs.readFileSync(file, 'utf8'));
      if (pkg.name === name) return pkg.version;
    }
    const parent = path.dirname(dir);
    if (parent === dir) return null;
    dir = parent;
  }
}
