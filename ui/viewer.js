// aidx review app: the image viewer, in the page (ui/app.py puts it in the page's head).
//
// The browser holds the pixels, as cornerstone does: each axial slice (and each coronal or
// sagittal reformat) comes once from /viewer/pixels as lossless int16 HU, and windowing, zoom,
// pan and scrolling happen here, without a server round trip per change. The findings' contours
// come from /viewer/marks.png (the server's own drawing, transparent elsewhere), laid over the
// slices they touch.
//
// PACS conventions: wheel and arrows (j/k) step slices, every step counted; PageUp/PageDown ten;
// Home/End the ends; left-drag windows (width across, level up and down), right-drag (or
// Ctrl+left) zooms, middle-drag (or Shift+left) pans; 1-3 the window presets; r resets; o the
// AI contours; i the corner text; v axial/coronal/sagittal; m the caliper; n/p the next or
// previous finding; a accept, x reject, Shift+S sign. A click (no drag) marks a point for a
// missed finding; a caliper line measures a diameter (mm) for the selected or a new finding.
//
// The server tells the page what to show through #viewer-meta (review, selected finding,
// marked point; a new rev with each server render, a new goto when the view must move to the
// selected finding); the page tells the server through #viewer-command (a JSON command and a
// click on #viewer-command-send). Without a study open nothing here acts.
(() => {
  'use strict';
  // A dark reading room: Gradio's dark theme whatever the system asks for (Gradio sets the
  // class from the system's preference; this sets it back).
  const dark = () => {
    if (!document.body) return;
    if (!document.body.classList.contains('dark')) document.body.classList.add('dark');
    new MutationObserver(() => {
      if (!document.body.classList.contains('dark')) document.body.classList.add('dark');
    }).observe(document.body, { attributes: true, attributeFilter: ['class'] });
  };
  if (document.body) dark(); else document.addEventListener('DOMContentLoaded', dark);
  const PRESETS = { lung: [1500, -600], mediastinum: [350, 50], bone: [2000, 500] };
  const PRESET_KEYS = { 1: 'lung', 2: 'mediastinum', 3: 'bone' };
  const PLANES = ['axial', 'coronal', 'sagittal'];
  const CACHE_MAX = 360;  // pictures kept (a 512² slice is 512 KiB)
  const $ = (sel, root = document) => root.querySelector(sel);
  const V = {
    study: null, review: null, rev: null, goto: null, sel: '', pt: [-1, 0, 0], lang: 'en',
    plane: 'axial', pos: 0, index: { coronal: 0, sagittal: 0 },
    ww: 1500, wl: -600, preset: 'lung', zoom: 1, panX: 0, panY: 0,
    overlays: true, info: true, measure: false, line: null, shown: null, pending: 0,
    generation: 0,
  };
  const pictures = new Map();  // url -> Promise<{w, h, data}>
  const marks = new Map();  // url -> Promise<ImageBitmap>
  let lut = null, lutKey = '';
  const scratch = document.createElement('canvas');
  const stats = { paints: 0, at: 0, shown: '', cached: 0, renderMs: [] };
  window.aidxViewer = stats;

  const meta = () => { const m = $('#viewer-meta [data-review]'); return m ? m.dataset : null; };
  const root = () => document.getElementById('aidx-viewer');
  const canvas = () => document.getElementById('aidx-canvas');
  const words = () => {
    const r = root();
    try { return r ? JSON.parse(r.dataset.words || '{}') : {}; } catch (e) { return {}; }
  };
  const say = (key, fallback) => words()[key] || fallback;

  // ------------------------------------------------------------------ geometry
  const count = () => (V.study ? V.study.count : 0);
  const planeSize = (plane) => {  // picture [width, height] in pixels, [mm/px x, mm/px y]
    const s = V.study, sp = s.spacing;
    if (plane === 'axial') return [s.cols, s.rows, sp.col, sp.row];
    if (plane === 'coronal') return [s.cols, s.count, sp.col, sp.slice];
    return [s.rows, s.count, sp.row, sp.slice];
  };
  const planeLimit = (plane) => (plane === 'axial' ? V.study.count
    : plane === 'coronal' ? V.study.rows : V.study.cols);
  const current = () => (V.plane === 'axial' ? V.pos : V.index[V.plane]);
  // The picture's transform on the canvas: scale (screen px per picture px, x and y) and the
  // screen position of the picture's top-left corner.
  const transform = () => {
    const c = canvas();
    const [w, h, mx, my] = planeSize(V.plane);
    const fit = Math.min(c.width / (w * mx), c.height / (h * my));
    const sx = fit * mx * V.zoom, sy = fit * my * V.zoom;
    return { sx, sy, x0: (c.width - w * sx) / 2 + V.panX, y0: (c.height - h * sy) / 2 + V.panY };
  };
  const toPicture = (ev) => {  // mouse event -> picture (x, y), fractional
    const c = canvas(), r = c.getBoundingClientRect(), t = transform();
    const px = (ev.clientX - r.left) * (c.width / r.width);
    const py = (ev.clientY - r.top) * (c.height / r.height);
    return [(px - t.x0) / t.sx - 0.5, (py - t.y0) / t.sy - 0.5];
  };
  // picture (x, y) in the current plane -> volume (pos, row, col)
  const toVolume = (x, y) => {
    if (V.plane === 'axial') return [V.pos, y, x];
    if (V.plane === 'coronal') return [Math.round(y), V.index.coronal, x];
    return [Math.round(y), x, V.index.sagittal];
  };

  // ------------------------------------------------------------------ fetching
  const pixelsUrl = (plane, index) =>
    `/viewer/pixels?review=${V.review}&plane=${plane}&index=${index}`;
  const picture = (plane, index) => {
    const url = pixelsUrl(plane, index);
    if (!pictures.has(url)) {
      const p = fetch(url, { credentials: 'same-origin' }).then((r) => {
        if (!r.ok) return r.text().then((t) => { throw new Error(t || String(r.status)); });
        const w = Number(r.headers.get('X-Aidx-Width')), h = Number(r.headers.get('X-Aidx-Height'));
        return r.arrayBuffer().then((b) => {
          stats.cached += 1;  // pictures fetched for this study
          return { w, h, data: new Int16Array(b) };
        });
      });
      p.catch(() => pictures.delete(url));
      pictures.set(url, p);
      while (pictures.size > CACHE_MAX) pictures.delete(pictures.keys().next().value);
    }
    return pictures.get(url);
  };
  const pointPos = () => {  // the marked point's scroll position (-1: none); pt is by volume index
    if (!V.study || V.pt[0] < 0) return -1;
    return V.study.forward ? V.pt[0] : V.study.count - 1 - V.pt[0];
  };
  const markedHere = (pos) => V.study && (pointPos() === pos || V.study.marked.includes(pos));
  const marksUrl = (pos) => `/viewer/marks.png?review=${V.review}&pos=${pos}&ov=${V.overlays ? 1 : 0}` +
    `&sel=${encodeURIComponent(V.sel)}&pt=${V.pt.join(',')}&rev=${V.rev}`;
  const marksReady = new Map();  // url -> ImageBitmap (or null), once fetched
  const marksFor = (pos) => {
    if (!markedHere(pos)) return Promise.resolve(null);
    const url = marksUrl(pos);
    if (!marks.has(url)) {
      const p = fetch(url, { credentials: 'same-origin' })
        .then((r) => (r.ok ? r.blob() : null))
        .then((b) => (b ? createImageBitmap(b) : null))
        .then((bitmap) => { marksReady.set(url, bitmap); return bitmap; });
      p.catch(() => marks.delete(url));
      marks.set(url, p);
      while (marks.size > 64) {
        const old = marks.keys().next().value;
        marks.delete(old);
        marksReady.delete(old);
      }
    }
    return marks.get(url);
  };
  let background = 0;
  const prefetchSeries = (generation) => {
    // After the first slice shows: the whole series, outward from the slice on screen, three at
    // a time, so that scrolling later never waits for the network.
    const n = count(), start = V.pos, order = [];
    for (let d = 1; d < n; d++) {
      if (start + d < n) order.push(start + d);
      if (start - d >= 0) order.push(start - d);
    }
    const next = () => {
      if (generation !== V.generation || !order.length) return;
      const pos = order.shift();
      picture('axial', pos).then(next, next);
    };
    background = generation;
    next(); next(); next();
  };

  // ------------------------------------------------------------------ drawing
  const windowLut = () => {
    const key = V.ww + '/' + V.wl;
    if (key !== lutKey) {
      lut = new Uint8ClampedArray(65536);
      const w = Math.max(V.ww, 1), c = V.wl;
      for (let i = 0; i < 65536; i++) {  // the linear VOI LUT function, PS3.3 C.11.2.1.2.1
        const x = i - 32768;
        lut[i] = w <= 1 ? (x <= c - 0.5 ? 0 : 255)
          : ((x - (c - 0.5)) / (w - 1) + 0.5) * 255 + 0.5;
      }
      lutKey = key;
    }
    return lut;
  };
  let fitted = '';
  const fitHeight = (r) => {
    // The pane fills the window below its top, leaving room for the scroll bar: no page
    // scrolling on the reading path (1366x768 and up). Worked out again when the window or the
    // pane's place changes.
    const top = r.getBoundingClientRect().top + window.scrollY;
    const key = [window.innerWidth, window.innerHeight, Math.round(top)].join();
    if (key === fitted) return;
    const below = document.getElementById('aidx-scrollbar');
    const room = window.innerHeight - top - (below ? below.offsetHeight : 0) - 12;
    let h = Math.max(Math.round(room), 320);
    r.style.height = h + 'px';
    const panel = document.getElementById('review-panel');  // the decisions scroll on their own
    let ph = 0;
    if (panel) {
      ph = Math.round(window.innerHeight - panel.getBoundingClientRect().top - window.scrollY - 8);
      ph = Math.max(ph, 320);
      panel.style.maxHeight = ph + 'px';
    }
    const over = document.scrollingElement.scrollHeight - window.innerHeight;
    if (over > 0) {  // the page's own margins below: take them off both
      if (h - over >= 320) { h -= over; r.style.height = h + 'px'; }
      if (panel && ph - over >= 320) panel.style.maxHeight = (ph - over) + 'px';
    }
    fitted = [window.innerWidth, window.innerHeight,
      Math.round(r.getBoundingClientRect().top + window.scrollY)].join();
  };
  let frame = 0;
  const draw = () => { if (!frame) frame = requestAnimationFrame(paint); };
  const paint = () => {
    frame = 0;
    const c = canvas(), r = root();
    if (!c || !r || !V.study) return;
    fitHeight(r);
    const box = c.getBoundingClientRect();
    if (box.width > 0 && (c.width !== Math.round(box.width) || c.height !== Math.round(box.height))) {
      c.width = Math.round(box.width);
      c.height = Math.round(box.height);
    }
    const plane = V.plane, index = current(), wanted = plane + ':' + index;
    const ticket = ++V.pending;
    const loading = setTimeout(() => { if (ticket === V.pending) showLoading(true); }, 120);
    // The slice is painted as soon as its pixels are here; its marks (contours, the marked
    // point) join it when they come, if they were not fetched ahead.
    const marked = plane === 'axial' && (V.overlays || pointPos() === index) &&
      markedHere(index);
    const murl = marked ? marksUrl(index) : null;
    if (marked) marksFor(index);
    picture(plane, index).then((pic) => {
      clearTimeout(loading);
      if (ticket !== V.pending) return;  // a later step is on its way
      showLoading(false);
      V.shown = wanted;
      const ready = murl !== null && marksReady.has(murl);
      render(pic, ready ? marksReady.get(murl) : null);
      if (murl !== null && !ready) {
        marksFor(index).then(() => { if (ticket === V.pending) draw(); }, () => {});
      }
      if (background !== V.generation) prefetchSeries(V.generation);
    }).catch((e) => {
      clearTimeout(loading);
      if (ticket !== V.pending) return;
      showLoading(false);
      message(String(e.message || e));
    });
    corners();
  };
  const render = (pic, overlay) => {
    const began = performance.now();
    const c = canvas(), g = c.getContext('2d');
    scratch.width = pic.w;
    scratch.height = pic.h;
    const sg = scratch.getContext('2d'), img = sg.createImageData(pic.w, pic.h);
    const out = new Uint32Array(img.data.buffer), table = windowLut(), d = pic.data;
    const gray = new Uint32Array(256);
    for (let i = 0; i < 256; i++) gray[i] = 0xff000000 | (i << 16) | (i << 8) | i;
    for (let i = 0; i < d.length; i++) out[i] = gray[table[d[i] + 32768]];
    sg.putImageData(img, 0, 0);
    g.fillStyle = '#000';
    g.fillRect(0, 0, c.width, c.height);
    const t = transform();
    g.imageSmoothingEnabled = V.zoom < 2;
    g.drawImage(scratch, t.x0, t.y0, pic.w * t.sx, pic.h * t.sy);
    if (overlay) {
      g.imageSmoothingEnabled = false;
      g.drawImage(overlay, t.x0, t.y0, pic.w * t.sx, pic.h * t.sy);
    }
    if (V.plane !== 'axial') drawReformatMarks(g, t);
    drawLine(g, t);
    stats.paints += 1;  // for the tests and benchmarks/ui_latency.py
    stats.at = performance.now();
    stats.renderMs.push(stats.at - began);
    if (stats.renderMs.length > 1000) stats.renderMs.shift();
    stats.shown = V.plane + ':' + current();
  };
  const drawReformatMarks = (g, t) => {
    // The axial slice on screen as a reference line, and each finding's circle where this
    // coronal or sagittal picture cuts it.
    const y = t.y0 + (V.pos + 0.5) * t.sy;
    g.save();
    g.setLineDash([6, 6]);
    g.strokeStyle = 'rgba(255,255,0,0.6)';
    g.beginPath(); g.moveTo(0, y); g.lineTo(canvas().width, y); g.stroke();
    g.restore();
    if (!V.overlays) return;
    const sp = V.study.spacing, coronal = V.plane === 'coronal';
    for (const f of V.study.findings) {
      if (f.status === 'removed' || f.status === 'rejected') continue;
      const across = coronal ? (f.row - V.index.coronal) * sp.row
        : (f.col - V.index.sagittal) * sp.col;
      const radius = f.diameter_mm / 2;
      if (Math.abs(across) > radius) continue;
      const r = Math.sqrt(radius * radius - across * across);
      const cx = t.x0 + ((coronal ? f.col : f.row) + 0.5) * t.sx;
      const cy = t.y0 + (f.pos + 0.5) * t.sy;
      const rx = (r / (coronal ? sp.col : sp.row)) * t.sx, ry = (r / sp.slice) * t.sy;
      g.strokeStyle = f.colour;
      g.lineWidth = f.key === V.sel ? 3 : 1.5;
      g.beginPath();
      g.ellipse(cx, cy, Math.max(rx, 3), Math.max(ry, 3), 0, 0, 2 * Math.PI);
      g.stroke();
      g.fillStyle = f.colour;
      g.font = '12px sans-serif';
      g.fillText(f.key, cx + Math.max(rx, 3) + 3, cy - Math.max(ry, 3));
    }
    g.lineWidth = 1;
  };
  const lineLength = (line) => {  // mm
    const [, , mx, my] = planeSize(line.plane);
    return Math.hypot((line.b[0] - line.a[0]) * mx, (line.b[1] - line.a[1]) * my);
  };
  const drawLine = (g, t) => {
    const line = V.line;
    if (!line || line.plane !== V.plane || line.index !== current()) return;
    const ax = t.x0 + (line.a[0] + 0.5) * t.sx, ay = t.y0 + (line.a[1] + 0.5) * t.sy;
    const bx = t.x0 + (line.b[0] + 0.5) * t.sx, by = t.y0 + (line.b[1] + 0.5) * t.sy;
    g.strokeStyle = '#ffd400';
    g.lineWidth = 2;
    g.beginPath(); g.moveTo(ax, ay); g.lineTo(bx, by); g.stroke();
    for (const [x, y] of [[ax, ay], [bx, by]]) {
      g.beginPath(); g.arc(x, y, 3, 0, 2 * Math.PI); g.stroke();
    }
    g.font = 'bold 14px sans-serif';
    g.fillStyle = '#ffd400';
    g.fillText(lineLength(line).toFixed(1) + ' mm', Math.max(ax, bx) + 6, Math.min(ay, by) - 6);
    g.lineWidth = 1;
  };
  const set = (id, text) => { const e = document.getElementById(id); if (e) e.textContent = text; };
  const corners = () => {
    const r = root(), s = V.study;
    if (!r || !s) return;
    r.dataset.pos = String(V.pos + 1);
    r.dataset.plane = V.plane;
    r.dataset.ww = String(Math.round(V.ww));
    r.dataset.wl = String(Math.round(V.wl));
    r.dataset.zoom = String(Math.round(V.zoom * 100));
    r.dataset.preset = V.preset;
    r.dataset.pan = `${Math.round(V.panX)},${Math.round(V.panY)}`;
    r.classList.toggle('aidx-no-info', !V.info);
    r.classList.toggle('aidx-measuring', V.measure);
    const p = s.patient, st = s.study;
    set('aidx-tl', [p.name || say('unknown_patient', '(no name)'),
      p.id ? say('id', 'ID') + ' ' + p.id : '',
      [p.born, p.sex].filter(Boolean).join('  ')].filter(Boolean).join('\n'));
    set('aidx-tr', [st.date, st.description, st.accession ? say('accession', 'Acc.') + ' ' +
      st.accession : ''].filter(Boolean).join('\n'));
    const where = V.plane === 'axial'
      ? say('image_of', 'Image {image} · {position} of {count}')
        .replace('{image}', s.images[V.pos]).replace('{position}', V.pos + 1)
        .replace('{count}', s.count)
      : say('plane_' + V.plane, V.plane) + ' ' + (current() + 1) + ' / ' + planeLimit(V.plane);
    const loc = say('location', 'Loc. {location} mm').replace('{location}',
      Number(s.locations[V.pos]).toFixed(1));
    const thick = s.series.thickness ? say('thickness', 'Thk {thickness} mm')
      .replace('{thickness}', Number(s.series.thickness).toFixed(2).replace(/\.?0+$/, '')) : '';
    set('aidx-bl', [[s.series.number ? say('series', 'Se') + ' ' + s.series.number : '',
      s.series.description].filter(Boolean).join(' · '), where,
    [loc, thick].filter(Boolean).join(' · ')].filter(Boolean).join('\n'));
    set('aidx-slice-info', where + ' · ' + loc);
    set('aidx-br', [`W ${Math.round(V.ww)}  L ${Math.round(V.wl)}`,
      say('zoom', 'Zoom') + ' ' + Math.round(V.zoom * 100) + '%'].join('\n'));
    const scroll = document.getElementById('aidx-scroll');
    if (scroll) {
      scroll.max = String(planeLimit(V.plane));
      scroll.value = String(current() + 1);
    }
    const ww = document.getElementById('aidx-ww'), wl = document.getElementById('aidx-wl');
    if (ww && document.activeElement !== ww) ww.value = String(Math.round(V.ww));
    if (wl && document.activeElement !== wl) wl.value = String(Math.round(V.wl));
    document.querySelectorAll('#aidx-toolbar [data-preset]').forEach((b) => {
      b.classList.toggle('aidx-on', b.dataset.preset === V.preset);
    });
    document.querySelectorAll('#aidx-toolbar [data-plane]').forEach((b) => {
      b.classList.toggle('aidx-on', b.dataset.plane === V.plane);
    });
    const toggles = { overlays: V.overlays, info: V.info, measure: V.measure };
    document.querySelectorAll('#aidx-toolbar [data-toggle]').forEach((b) => {
      b.classList.toggle('aidx-on', !!toggles[b.dataset.toggle]);
    });
  };
  const showLoading = (on) => {
    const e = document.getElementById('aidx-loading');
    if (e) e.hidden = !on;
  };
  const message = (text) => {
    const e = document.getElementById('aidx-note');
    if (e) e.textContent = text ? '⚠ ' + text : '';
  };

  // ------------------------------------------------------------------ actions
  const step = (delta) => {
    if (!V.study) return false;
    const limit = planeLimit(V.plane), now = current();
    const next = Math.min(Math.max(now + delta, 0), limit - 1);
    if (next !== now) {
      if (V.plane === 'axial') V.pos = next; else V.index[V.plane] = next;
      if (V.plane === 'axial') {
        for (let i = 1; i <= 8; i++) {  // ahead in the direction of travel first
          const p = next + i * Math.sign(delta);
          if (p >= 0 && p < limit) {
            picture('axial', p);
            if (V.overlays && i <= 4) marksFor(p);
          }
        }
      }
      draw();
    }
    return true;
  };
  window.aidxStep = step;
  const setWindow = (ww, wl, preset) => {
    message('');
    V.ww = Math.min(Math.max(ww, 1), 65536);
    V.wl = Math.min(Math.max(wl, -32768), 32767);
    V.preset = preset;
    draw();
  };
  const usePreset = (name) => { const [w, l] = PRESETS[name]; setWindow(w, l, name); };
  const reset = () => {
    V.zoom = 1; V.panX = 0; V.panY = 0; V.line = null;
    usePreset('lung');
  };
  const setPlane = (plane) => {
    if (!V.study || !PLANES.includes(plane)) return;
    V.plane = plane;
    V.zoom = 1; V.panX = 0; V.panY = 0;
    draw();
  };
  const command = (cmd) => {
    const box = $('#viewer-command textarea') || $('#viewer-command input');
    const send = document.getElementById('viewer-command-send');
    if (!box || !send) return;
    box.value = JSON.stringify(cmd);
    box.dispatchEvent(new Event('input', { bubbles: true }));
    setTimeout(() => send.click(), 0);  // after Gradio has taken the value
  };
  // A decision key pressed while a selection is on its way waits for it: it is for the finding
  // the reader moved to, not the one before.
  let selecting = false, queued = null, selectTimer = 0;
  const decide = (button) => {
    if (selecting) { queued = button; return; }
    document.getElementById(button)?.click();
  };
  const selectRelative = (delta) => {
    const keys = (V.study ? V.study.findings : []).map((f) => f.key);
    if (!keys.length) return;
    const at = keys.indexOf(V.sel);
    const next = at < 0 ? (delta > 0 ? 0 : keys.length - 1)
      : Math.min(Math.max(at + delta, 0), keys.length - 1);
    if (keys[next] !== V.sel || at < 0) {
      selecting = true;
      clearTimeout(selectTimer);  // refused (no new render): give up, dropping the decision
      selectTimer = setTimeout(() => { selecting = false; queued = null; }, 5000);
      command({ op: 'select', key: keys[next] });
    }
  };
  const mark = (x, y) => {
    const [pos, row, col] = toVolume(x, y);
    command({ op: 'point', pos, row, col });
  };
  const measured = (line) => {
    // A diameter for the selected finding when the line crosses it, else for a new finding at
    // the line's middle (the point, as a click marks it).
    const mm = Math.round(lineLength(line) * 10) / 10;
    const mid = [(line.a[0] + line.b[0]) / 2, (line.a[1] + line.b[1]) / 2];
    const [pos, row, col] = toVolume(mid[0], mid[1]);
    const f = V.study.findings.find((g) => g.key === V.sel);
    const sp = V.study.spacing;
    const onSelected = f && Math.hypot((f.pos - pos) * sp.slice, (f.row - row) * sp.row,
      (f.col - col) * sp.col) <= f.diameter_mm / 2 + 5;
    command({ op: 'measure', mm, target: onSelected ? 'selected' : 'new', pos, row, col });
  };

  // ------------------------------------------------------------------ server state
  const follow = () => {
    const m = meta();
    if (!m) {
      if (V.review !== null) { V.review = null; V.study = null; V.generation++; }
      return;
    }
    if (m.rev === V.rev) return;
    if (selecting) {  // the server's answer to the selection: a waiting decision goes now
      selecting = false;
      const button = queued;
      queued = null;
      if (button) setTimeout(() => decide(button), 0);
    }
    const review = Number(m.review), fresh = review !== V.review;
    V.rev = m.rev;
    V.sel = m.sel || '';
    V.lang = m.lang || 'en';
    V.pt = (m.pt || '-1,0,0').split(',').map(Number);
    const goto = m.goto;
    if (fresh) {
      V.review = review;
      V.generation++;
      pictures.clear();
      marks.clear();
      marksReady.clear();
      stats.cached = 0;
      V.study = null;
      V.line = null;
      V.plane = 'axial';
      V.zoom = 1; V.panX = 0; V.panY = 0;
      usePreset('lung');
      showLoading(true);
    }
    const generation = V.generation;
    fetch(`/viewer/study.json?review=${review}`, { credentials: 'same-origin' })
      .then((r) => (r.ok ? r.json() : r.text().then((t) => { throw new Error(t); })))
      .then((study) => {
        if (generation !== V.generation) return;
        V.study = study;
        if (fresh || goto !== V.goto) {
          V.goto = goto;
          V.pos = Math.min(Math.max(Number(m.pos) - 1, 0), study.count - 1);
          const f = study.findings.find((g) => g.key === V.sel);
          V.index.coronal = Math.round(f ? f.row : study.rows / 2);
          V.index.sagittal = Math.round(f ? f.col : study.cols / 2);
          if (f && V.plane !== 'axial') V.pos = Math.round(f.pos);
        }
        opening(false);
        draw();
      })
      .catch((e) => { opening(false); showLoading(false); message(String(e.message || e)); });
  };
  new MutationObserver(() => {
    follow();
    const r = root();
    if (r && V.study && V.shown === null) draw();
  }).observe(document.documentElement, { subtree: true, childList: true, attributes: true,
    attributeFilter: ['data-rev'] });
  new ResizeObserver(() => draw()).observe(document.documentElement);
  const opening = (on) => {
    const e = document.getElementById('aidx-opening');
    if (e) e.hidden = !on;
  };
  let openingTimer = 0;
  document.addEventListener('click', (e) => {
    // A worklist row opens a study: say so at once (the server loads the series).
    const cell = e.target.closest && e.target.closest('#worklist [role=gridcell]');
    if (!cell) return;
    opening(true);
    clearTimeout(openingTimer);
    openingTimer = setTimeout(() => opening(false), 30000);
  }, true);
  // A refused open (a message beside the controls) ends the indicator too; a study that opens
  // ends it once its description is here (follow).
  let said = null;
  new MutationObserver(() => {
    const text = document.getElementById('message')?.textContent ?? '';
    if (said !== null && text !== said) opening(false);
    said = text;
  }).observe(document.documentElement, { subtree: true, childList: true, characterData: true });

  // ------------------------------------------------------------------ input
  const typing = (t) => t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' ||
    t.tagName === 'SELECT' || t.isContentEditable);
  document.addEventListener('keydown', (e) => {
    if (typing(e.target) || e.ctrlKey || e.metaKey || e.altKey || !V.study) return;
    const steps = { ArrowDown: 1, j: 1, ArrowUp: -1, k: -1, PageDown: 10, PageUp: -10,
      End: 1e6, Home: -1e6 };
    const keys = {
      r: reset, o: () => { V.overlays = !V.overlays; draw(); },
      i: () => { V.info = !V.info; draw(); },
      m: () => { V.measure = !V.measure; draw(); },
      v: () => setPlane(PLANES[(PLANES.indexOf(V.plane) + 1) % 3]),
      n: () => selectRelative(1), p: () => selectRelative(-1),
      a: () => decide('accept'), x: () => decide('reject'), S: () => decide('sign'),
      Escape: () => { V.measure = false; V.line = null; draw(); },
    };
    if (e.key in steps) step(steps[e.key]);
    else if (e.key in PRESET_KEYS) usePreset(PRESET_KEYS[e.key]);
    else if (e.key in keys) keys[e.key]();
    else return;
    e.preventDefault();
  });
  let wheelRest = 0;
  document.addEventListener('wheel', (e) => {
    const r = root();
    if (!r || !r.contains(e.target) || !V.study) return;
    e.preventDefault();
    const delta = e.deltaMode === 1 ? e.deltaY * 40 : e.deltaY;
    if (Math.abs(delta) >= 50) { wheelRest = 0; step(Math.sign(delta)); return; }
    wheelRest += delta;  // a touchpad's small deltas add up to a step
    if (Math.abs(wheelRest) >= 50) { step(Math.sign(wheelRest)); wheelRest = 0; }
  }, { passive: false });
  let drag = null;
  document.addEventListener('contextmenu', (e) => {
    if (canvas() && canvas().contains(e.target)) e.preventDefault();
  });
  document.addEventListener('mousedown', (e) => {
    const c = canvas();
    if (!c || e.target !== c || !V.study) return;
    e.preventDefault();
    root()?.focus({ preventScroll: true });
    let mode = 'window';
    if (e.button === 2 || (e.button === 0 && e.ctrlKey)) mode = 'zoom';
    else if (e.button === 1 || (e.button === 0 && e.shiftKey)) mode = 'pan';
    else if (V.measure) mode = 'measure';
    const at = toPicture(e);
    drag = { mode, x: e.clientX, y: e.clientY, sx: e.clientX, sy: e.clientY, moved: false,
      at, ww: V.ww, wl: V.wl };
    if (mode === 'measure') V.line = { plane: V.plane, index: current(), a: at, b: at };
  });
  document.addEventListener('mousemove', (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    drag.x = e.clientX; drag.y = e.clientY;
    if (Math.hypot(e.clientX - drag.sx, e.clientY - drag.sy) > 3) drag.moved = true;
    if (drag.mode === 'window') {
      if (!drag.moved) return;
      const gain = Math.max(V.ww / 250, 1);  // coarse for wide windows, 1 HU for narrow
      setWindow(V.ww + dx * gain, V.wl + dy * gain, 'manual');
    } else if (drag.mode === 'zoom') {
      V.zoom = Math.min(Math.max(V.zoom * Math.exp(-dy / 150), 0.25), 16);
      draw();
    } else if (drag.mode === 'pan') {
      const c = canvas(), r = c.getBoundingClientRect();
      V.panX += dx * (c.width / r.width); V.panY += dy * (c.height / r.height);
      draw();
    } else if (drag.mode === 'measure') {
      V.line.b = toPicture(e);
      draw();
    }
  });
  document.addEventListener('mouseup', (e) => {
    if (!drag) return;
    const d = drag;
    drag = null;
    if (d.mode === 'measure') {
      if (d.moved && V.line && lineLength(V.line) > 0.5) measured(V.line);
      else V.line = null;
      draw();
    } else if (!d.moved && e.button === 0 && d.mode === 'window') {
      const [pw, ph] = planeSize(V.plane);
      const [x, y] = d.at;
      if (x >= -0.5 && y >= -0.5 && x <= pw - 0.5 && y <= ph - 0.5) mark(x, y);
    }
  });
  document.addEventListener('click', (e) => {
    const b = e.target.closest && e.target.closest('.aidx-tools button');
    if (!b || !V.study) return;
    if (b.dataset.preset) usePreset(b.dataset.preset);
    else if (b.dataset.plane) setPlane(b.dataset.plane);
    else if (b.dataset.toggle) { V[b.dataset.toggle] = !V[b.dataset.toggle]; draw(); }
    else if (b.dataset.action === 'reset') reset();
    else if (b.dataset.action === 'prev') step(-1);
    else if (b.dataset.action === 'next') step(1);
  });
  document.addEventListener('keydown', (e) => {  // Enter in the window boxes: a typed window
    if (e.key !== 'Enter' || !e.target.id || !['aidx-ww', 'aidx-wl'].includes(e.target.id)) return;
    const w = Number(document.getElementById('aidx-ww').value);
    const l = Number(document.getElementById('aidx-wl').value);
    if (!Number.isFinite(w) || !Number.isFinite(l) || w < 1) {
      message(say('bad_window', 'The window width must be a number of at least 1 HU.'));
      return;
    }
    message('');
    setWindow(w, l, 'manual');
    e.target.blur();
  }, true);
  document.addEventListener('input', (e) => {
    if (e.target.id !== 'aidx-scroll' || !V.study) return;
    const to = Number(e.target.value) - 1;
    step(to - current());
  });
})();
