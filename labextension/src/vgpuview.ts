/**
 * One vGPU's section of the panel: its facts, the two charts, the tier buttons with their progress,
 * the notebooks that use it and its recent CUDA calls.
 *
 * Built once and updated in place at every poll, so a button being clicked is never replaced under
 * the pointer and the charts keep their element (tests find everything by data-testid).
 */
import { Action, GPU, Tiers, VGPU, VgpuApi } from './api';
import { TierRequest, WORDING, confirm, run } from './actions';
import { createChart, drawShare, drawVram } from './charts';
import * as fmt from './format';
import { VgpuModel } from './model';

function make<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  testid?: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (testid) {
    node.dataset.testid = testid;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function tierLine(tiers: Tiers): string {
  return `hot ${fmt.bytes(tiers.hot)} · warm ${fmt.bytes(tiers.warm)} · cold ${fmt.bytes(tiers.cold)}`;
}

/** Seconds a quiet vGPU's answer may serve (the server's background_refresh default) when it does not say. */
const QUIET_REFRESH = 10;

/** What the panel says while an action moves memory, per request. */
const DOING: Record<TierRequest, string> = {
  warm: 'Freeing GPU memory',
  cold: 'Moving to disk',
  restore: 'Restoring'
};

export class VgpuView {
  readonly node = make('section', 'gpulab-vgpu', 'gpulab-vgpu');

  constructor(
    private readonly model: VgpuModel,
    private readonly api: VgpuApi,
    id: string
  ) {
    this.node.dataset.vgpuId = id;
    const facts = make('dl', 'gpulab-facts');
    const fact = (label: string, testid: string) => {
      facts.append(make('dt', '', undefined, label));
      const dd = make('dd', '', testid);
      facts.append(dd);
      return dd;
    };
    this.profile = fact('Profile', 'gpulab-profile');
    this.worker = fact('Worker', 'gpulab-worker');
    this.gpu = fact('GPU', 'gpulab-gpu');
    // the tier, and beside it how old the figures are when the server's answer is stale
    const tierFact = fact('Tier', '');
    this.tier = make('span', '', 'gpulab-tier');
    this.asOf = make('span', 'gpulab-asof', 'gpulab-asof');
    this.asOf.hidden = true;
    tierFact.append(this.tier, this.asOf);
    this.vram = fact('GPU memory', 'gpulab-vram-text');
    this.compute = fact('Compute', 'gpulab-compute');
    this.node.append(facts);

    this.vramChart = createChart('gpulab-vram-chart', 'GPU memory over time per tier');
    this.shareChart = createChart('gpulab-share-chart', 'Compute use against the share');
    const vramLegend = legend([
      ['gpulab-tier-hot', 'hot (on the GPU)'],
      ['gpulab-tier-warm', 'warm (host memory)'],
      ['gpulab-tier-cold', 'cold (disk)'],
      ['gpulab-quota', 'quota']
    ]);
    this.quotaLegend = vramLegend.lastChild!.lastChild!;
    this.node.append(
      make('h3', 'gpulab-heading', undefined, 'GPU memory over time'),
      this.vramChart,
      vramLegend,
      make('h3', 'gpulab-heading', undefined, 'Compute use against the share'),
      this.shareChart,
      legend([
        ['gpulab-measured', 'measured use'],
        ['gpulab-share', 'share']
      ])
    );

    const buttons = make('div', 'gpulab-buttons');
    this.buttons = {
      warm: this.button('warm', 'gpulab-offload-warm'),
      cold: this.button('cold', 'gpulab-offload-cold'),
      restore: this.button('restore', 'gpulab-restore')
    };
    buttons.append(this.buttons.warm, this.buttons.cold, this.buttons.restore);
    this.progress = make('div', 'gpulab-progress', 'gpulab-action');
    this.outcome = make('div', 'gpulab-outcome', 'gpulab-action-outcome');
    this.progress.hidden = true;
    this.outcome.hidden = true;
    this.node.append(buttons, this.progress, this.outcome);

    this.kernels = make('table', 'gpulab-table', 'gpulab-kernels');
    this.trace = make('table', 'gpulab-table', 'gpulab-trace');
    this.node.append(
      make('h3', 'gpulab-heading', undefined, 'Notebooks and kernels'),
      this.kernels,
      make('h3', 'gpulab-heading', undefined, 'Recent CUDA calls'),
      this.trace
    );
  }

  update(vgpu: VGPU, gpus: GPU[]): void {
    this.vgpu = vgpu;
    this.profile.textContent = vgpu.profile || '–';
    this.worker.textContent = vgpu.worker || '–';
    const models = (vgpu.gpus ?? []).map(uuid => gpus.find(g => g.uuid === uuid)?.model ?? uuid);
    this.gpu.textContent = models.length ? models.join(', ') : 'none';
    this.tier.textContent = vgpu.tier;
    this.tier.dataset.tier = vgpu.tier;
    this.showAge();
    this.vram.textContent =
      `${fmt.usedOfQuota(vgpu.used + vgpu.overhead, vgpu.quota)} ` +
      `(context overhead ${fmt.bytes(vgpu.overhead)}) · ${tierLine(vgpu.tiers ?? { hot: vgpu.used, warm: 0, cold: 0 })}`;
    this.compute.textContent = `${fmt.percent(vgpu.share_measured)} used of a ${fmt.percent(vgpu.share)} share`;
    this.quotaLegend.textContent = `quota ${fmt.bytes(vgpu.quota)}`;
    const samples = this.model.history(vgpu.id);
    drawVram(this.vramChart, samples);
    drawShare(this.shareChart, samples);
    this.updateButtons();
    if (this.running === null && vgpu.action) {
      // started elsewhere (another tab, %vgpu): its progress too, then its outcome
      if (vgpu.action.state === 'running') {
        this.watching = vgpu.action.id;
        this.showProgress(vgpu.action);
      } else if (this.watching === vgpu.action.id) {
        this.watching = null;
        this.showOutcome(vgpu.action);
      }
    }
    this.fillKernels(vgpu);
    this.fillTrace();
  }

  /**
   * "as of 12:03:04" beside the tier when the server's answer (its "time") is older than two refresh
   * intervals, the page's or the server's (its "refresh"), whichever is longer, and older than the
   * server's quiet pace (a quiet vGPU's answer serves up to background_refresh, 10 s), with a second
   * for the way. At the defaults (5 s) only an answer the server could not renew (a slow or lost
   * worker) shows its age; nothing while the figures are fresh.
   */
  private showAge(): void {
    const overview = this.model.overview;
    const time = overview?.time;
    const refresh = Math.max(this.model.interval, overview?.refresh ?? 0);
    const limit = Math.max(2 * refresh, overview?.background_refresh ?? QUIET_REFRESH) + 1;
    if (typeof time !== 'number' || Date.now() / 1000 - time <= limit) {
      this.asOf.hidden = true;
      this.asOf.textContent = '';
      this.asOf.title = '';
      return;
    }
    this.asOf.hidden = false;
    this.asOf.textContent = `as of ${fmt.clock(time)}`;
    this.asOf.title = `The figures are the worker's answer of ${new Date(time * 1000).toLocaleString()}.`;
  }

  private button(request: TierRequest, testid: string): HTMLButtonElement {
    const b = make('button', 'jp-Button jp-mod-styled gpulab-button', testid, WORDING[request].title);
    b.type = 'button';
    b.addEventListener('click', () => void this.act(request));
    return b;
  }

  private updateButtons(): void {
    const v = this.vgpu;
    const busy = this.running !== null || v?.action?.state === 'running';
    const hot = v?.tiers?.hot ?? 0;
    const off = (v?.tiers?.warm ?? 0) + (v?.tiers?.cold ?? 0);
    this.buttons.warm.disabled = busy || hot === 0;
    this.buttons.cold.disabled = busy || hot + (v?.tiers?.warm ?? 0) === 0;
    this.buttons.restore.disabled = busy || off === 0;
    this.buttons.warm.title = hot === 0 ? 'Nothing of this vGPU is on the GPU.' : '';
    this.buttons.restore.title = off === 0 ? 'Nothing of this vGPU is off the GPU.' : '';
  }

  private async act(request: TierRequest): Promise<void> {
    const vgpu = this.vgpu;
    if (!vgpu || this.running || !(await confirm(request, vgpu))) {
      return;
    }
    this.running = request;
    this.updateButtons();
    this.outcome.hidden = true;
    try {
      const done = await run(this.api, vgpu, request, a => this.showProgress(a));
      this.showOutcome(done);
    } catch (err) {
      this.progress.hidden = true;
      this.outcome.hidden = false;
      this.outcome.dataset.state = 'failed';
      this.outcome.textContent = (err as Error).message;
    } finally {
      this.running = null;
      this.updateButtons();
      void this.model.refresh();
    }
  }

  private showProgress(action: Action): void {
    const request: TierRequest = action.kind === 'restore' ? 'restore' : (action.to as TierRequest);
    this.progress.hidden = action.state !== 'running';
    this.progress.dataset.state = action.state;
    this.progress.textContent =
      `${DOING[request] ?? 'Moving'}… ${fmt.seconds(action.elapsed ?? 0)} · ` + tierLine(action.tiers);
  }

  private showOutcome(action: Action): void {
    this.progress.hidden = true;
    this.outcome.hidden = false;
    this.outcome.dataset.state = action.state;
    const fallback =
      action.state === 'done'
        ? `Done in ${fmt.seconds(action.elapsed ?? 0)}: ${tierLine(action.tiers)}.`
        : `The worker could not finish (HTTP ${action.status ?? '?'}).`;
    this.outcome.textContent = action.message || fallback;
  }

  private fillKernels(vgpu: VGPU): void {
    const rows: string[][] = (vgpu.kernels ?? []).map(k => [
      k.notebook ?? `kernel ${k.name} (${k.kernel_id.slice(0, 8)})`,
      k.execution_state,
      fmt.bytes(k.used + k.overhead),
      String(k.calls)
    ]);
    for (const p of vgpu.other_processes ?? []) {
      rows.push([`process ${p.client_pid || p.pid} (no kernel)`, '', fmt.bytes(p.used + p.overhead), String(p.calls)]);
    }
    fillTable(
      this.kernels,
      ['Notebook', 'State', 'GPU memory', 'CUDA calls'],
      rows,
      'No notebook or program uses this vGPU right now.',
      'gpulab-kernel'
    );
  }

  private fillTrace(): void {
    const records = this.vgpu ? this.model.trace(this.vgpu.id) : [];
    const rows = [...records].reverse().map(r => [
      fmt.clock(r.time),
      r.function,
      r.bytes ? fmt.bytes(r.bytes) : '',
      `${(r.duration * 1000).toFixed(2)} ms`,
      r.error || 'ok'
    ]);
    fillTable(
      this.trace,
      ['Time', 'Call', 'Bytes', 'Took', 'Result'],
      rows,
      'No CUDA calls yet.',
      'gpulab-call'
    );
  }

  private vgpu: VGPU | null = null;
  private running: TierRequest | null = null;
  private watching: string | null = null;
  private readonly profile: HTMLElement;
  private readonly worker: HTMLElement;
  private readonly gpu: HTMLElement;
  private readonly tier: HTMLElement;
  private readonly asOf: HTMLElement;
  private readonly vram: HTMLElement;
  private readonly compute: HTMLElement;
  private readonly vramChart: SVGSVGElement;
  private readonly quotaLegend: ChildNode;
  private readonly shareChart: SVGSVGElement;
  private readonly buttons: Record<TierRequest, HTMLButtonElement>;
  private readonly progress: HTMLElement;
  private readonly outcome: HTMLElement;
  private readonly kernels: HTMLTableElement;
  private readonly trace: HTMLTableElement;
}

function legend(entries: [string, string][]): HTMLElement {
  const box = make('div', 'gpulab-legend');
  for (const [cls, label] of entries) {
    const item = make('span', 'gpulab-legend-item');
    item.append(make('span', `gpulab-swatch ${cls}`), document.createTextNode(label));
    box.append(item);
  }
  return box;
}

function fillTable(table: HTMLTableElement, head: string[], rows: string[][], empty: string, rowId: string): void {
  table.replaceChildren();
  if (rows.length === 0) {
    const tr = make('tr', 'gpulab-empty-row');
    const td = make('td', '', undefined, empty);
    td.colSpan = head.length;
    tr.append(td);
    table.append(tr);
    return;
  }
  const thead = make('tr', '');
  thead.append(...head.map(h => make('th', '', undefined, h)));
  table.append(thead);
  for (const row of rows) {
    const tr = make('tr', '', rowId);
    tr.append(...row.map(cell => make('td', '', undefined, cell)));
    table.append(tr);
  }
}
