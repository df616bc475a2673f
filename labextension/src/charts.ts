/**
 * The panel's two charts as plain SVG: VRAM per tier over time (stacked, with the quota as a line)
 * and compute use against the share. A few dozen lines of our own instead of a chart library;
 * colours come from CSS classes that use the theme's variables, so light and dark themes both work.
 *
 * Each chart also writes what it drew into data attributes (data-samples, data-last, data-peak), so
 * tests and screen readers read figures, not pixels.
 */
import { Sample, Tier } from './api';
import { bytes, percent } from './format';

const SVG = 'http://www.w3.org/2000/svg';
const WIDTH = 300;
const HEIGHT = 100;
const TIERS: Tier[] = ['hot', 'warm', 'cold'];

function el(name: string, attrs: Record<string, string>): SVGElement {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, value);
  }
  return node;
}

/** An empty chart element: the panel creates it once and redraws into it. */
export function createChart(testid: string, label: string): SVGSVGElement {
  const svg = el('svg', {
    class: 'gpulab-chart',
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    preserveAspectRatio: 'none',
    role: 'img',
    'aria-label': label,
    'data-testid': testid
  }) as SVGSVGElement;
  return svg;
}

/** x positions across the width, by time; a single sample spans the whole width. */
function xs(samples: Sample[]): number[] {
  const first = samples[0].t;
  const span = samples[samples.length - 1].t - first;
  if (samples.length === 1 || span <= 0) {
    return samples.map((_, i) => (samples.length === 1 ? WIDTH : (i / (samples.length - 1)) * WIDTH));
  }
  return samples.map(s => ((s.t - first) / span) * WIDTH);
}

/** Each figure holds until the next sample (a poll sees a state, not a ramp): a step line, whose
 * last step is as wide as an average one, so the newest state is visible too. */
function stepped(samples: Sample[]): Sample[] {
  const out = [samples[0]];
  for (let i = 1; i < samples.length; i++) {
    out.push({ ...samples[i - 1], t: samples[i].t }, samples[i]);
  }
  const last = samples[samples.length - 1];
  const gap = (last.t - samples[0].t) / Math.max(samples.length - 1, 1);
  out.push({ ...last, t: last.t + (gap > 0 ? gap : 1) });
  return out;
}

function y(value: number, top: number): number {
  return HEIGHT - (Math.max(0, value) / top) * HEIGHT;
}

function points(x: number[], ys: number[]): string {
  return x.map((xi, i) => `${xi.toFixed(1)},${ys[i].toFixed(1)}`).join(' ');
}

function clear(svg: SVGSVGElement): void {
  while (svg.firstChild) {
    svg.removeChild(svg.firstChild);
  }
}

/** Stacked areas hot (bottom), warm, cold, and the quota as a dashed line. */
export function drawVram(svg: SVGSVGElement, samples: Sample[]): void {
  clear(svg);
  svg.setAttribute('data-samples', String(samples.length));
  if (samples.length === 0) {
    svg.removeAttribute('data-last');
    return;
  }
  const single = stepped(samples.length === 1 ? [{ ...samples[0], t: samples[0].t - 1 }, samples[0]] : samples);
  const x = xs(single);
  const quota = Math.max(...single.map(s => s.quota));
  const top = Math.max(quota, ...single.map(s => s.hot + s.warm + s.cold), 1) * 1.05;
  let below = single.map(() => 0);
  for (const tier of TIERS) {
    const above = single.map((s, i) => below[i] + s[tier]);
    const upper = points(x, above.map(v => y(v, top)));
    const lower = points([...x].reverse(), [...below].reverse().map(v => y(v, top)));
    svg.appendChild(el('polygon', { class: `gpulab-area gpulab-tier-${tier}`, points: `${upper} ${lower}` }));
    below = above;
  }
  const qy = y(quota, top).toFixed(1);
  svg.appendChild(el('line', { class: 'gpulab-quota', x1: '0', x2: String(WIDTH), y1: qy, y2: qy }));
  const last = samples[samples.length - 1];
  svg.setAttribute(
    'data-last',
    JSON.stringify({ hot: last.hot, warm: last.warm, cold: last.cold, quota: last.quota })
  );
  const peak: Record<Tier, number> = { hot: 0, warm: 0, cold: 0 };
  for (const s of samples) {
    for (const tier of TIERS) {
      peak[tier] = Math.max(peak[tier], s[tier]);
    }
  }
  svg.setAttribute('data-peak', JSON.stringify(peak));
  svg.setAttribute(
    'aria-label',
    `GPU memory: ${bytes(last.hot)} hot, ${bytes(last.warm)} warm, ${bytes(last.cold)} cold of ${bytes(quota)}`
  );
}

/** Measured compute use (area) against the vGPU's share (dashed line), both in percent of one GPU. */
export function drawShare(svg: SVGSVGElement, samples: Sample[]): void {
  clear(svg);
  const known = samples.filter(s => s.share !== null || s.share_measured !== null);
  svg.setAttribute('data-samples', String(known.length));
  if (known.length === 0) {
    svg.removeAttribute('data-last');
    return;
  }
  const series = stepped(known.length === 1 ? [{ ...known[0], t: known[0].t - 1 }, known[0]] : known);
  const x = xs(series);
  const top = Math.max(10, ...series.map(s => Math.max(s.share ?? 0, s.share_measured ?? 0))) * 1.2;
  const used = points(x, series.map(s => y(s.share_measured ?? 0, top)));
  svg.appendChild(
    el('polygon', {
      class: 'gpulab-area gpulab-measured',
      points: `${used} ${WIDTH},${HEIGHT} ${x[0].toFixed(1)},${HEIGHT}`
    })
  );
  svg.appendChild(
    el('polyline', { class: 'gpulab-share', points: points(x, series.map(s => y(s.share ?? 0, top))) })
  );
  const last = known[known.length - 1];
  svg.setAttribute('data-last', JSON.stringify({ share: last.share, share_measured: last.share_measured }));
  svg.setAttribute('aria-label', `Compute: ${percent(last.share_measured)} used of a ${percent(last.share)} share`);
}
