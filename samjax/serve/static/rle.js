// COCO RLE in the browser: the compressed `counts` string -> run lengths -> pixels.
// The string format is pycocotools' `rleToString` (maskApi.c): each count is a
// LEB128-like sequence of 5-bit groups offset by 48, and from the third count on it is
// stored as the difference to the count two places before. Runs alternate background
// / foreground over the column-major (Fortran order) flattening of the H x W mask.
"use strict";

const RLE = (() => {
  function counts(s) {
    const out = [];
    let p = 0;
    while (p < s.length) {
      let x = 0, k = 0, more = 1;
      while (more) {
        if (p >= s.length) throw new Error("truncated RLE string");
        const c = s.charCodeAt(p) - 48;
        x += (c & 0x1f) * 2 ** (5 * k);  // arithmetic, not <<: no 32-bit wrap
        more = c & 0x20;
        p++; k++;
        if (!more && (c & 0x10)) x -= 2 ** (5 * k);  // sign extension
      }
      if (out.length > 2) x += out[out.length - 2];
      out.push(x);
    }
    return Int32Array.from(out);
  }

  // Calls fn(rowMajorIndex) for every foreground pixel of an (h, w) mask.
  function forEachPixel(runs, h, w, fn) {
    const total = h * w;
    let idx = 0;
    for (let i = 0; i < runs.length && idx < total; i++) {
      const end = Math.min(idx + runs[i], total);
      if (i & 1) {
        let x = Math.floor(idx / h), y = idx - x * h;
        for (let j = idx; j < end; j++) {
          fn(y * w + x);
          if (++y === h) { y = 0; x++; }
        }
      }
      idx = end;
    }
  }

  // (h * w) Uint8Array, 1 where the mask is set, row-major.
  function decode(rle) {
    const [h, w] = rle.size;
    const out = new Uint8Array(h * w);
    forEachPixel(counts(rle.counts), h, w, (i) => { out[i] = 1; });
    return out;
  }

  return { counts, forEachPixel, decode };
})();
