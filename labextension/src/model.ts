/**
 * The one poller of the page: asks GET vgpus every refreshInterval seconds and keeps what the
 * status bar and the panel draw from (the overview, a chart history per vGPU, the recent calls).
 *
 * One poller, however many views, so the worker sees one control-API look per interval per page.
 * A vGPU's chart starts from the server's ring (GET vgpus/<id>/history, fetched once), so a panel
 * opened late still has a past; each later poll appends the figures it got.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { ApiError, Overview, Sample, TraceRecord, VGPU, VgpuApi } from './api';

/** Samples kept per vGPU: 25 minutes at the default 5 s. */
const MAX_SAMPLES = 300;

export class VgpuModel {
  constructor(readonly api: VgpuApi) {}

  /** Latest answer of GET vgpus; null until the first one. */
  overview: Overview | null = null;
  /** The sentence of the last failed poll, null once one succeeds. */
  error: string | null = null;
  /** Whether the panel is showing, so the poll also fetches the recent calls. */
  wantTrace = false;

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  history(id: string): Sample[] {
    return this._history.get(id) ?? [];
  }

  trace(id: string): TraceRecord[] {
    return this._trace.get(id) ?? [];
  }

  /** Seconds between two polls; takes effect from the next one. */
  get interval(): number {
    return this._interval / 1000;
  }

  set interval(seconds: number) {
    this._interval = Math.max(0.5, seconds) * 1000;
  }

  start(): void {
    if (!this._stopped) {
      return;
    }
    this._stopped = false;
    void this.refresh();
  }

  dispose(): void {
    this._stopped = true;
    window.clearTimeout(this._timer);
  }

  /** Poll now (after a tier action, or when the panel opens) and reschedule the next one. */
  async refresh(): Promise<void> {
    window.clearTimeout(this._timer);
    if (this._busy) {
      this._again = true;
      return;
    }
    this._busy = true;
    try {
      await this._poll();
    } finally {
      this._busy = false;
      if (!this._stopped) {
        this._timer = window.setTimeout(() => void this.refresh(), this._again ? 0 : this._interval);
      }
      this._again = false;
    }
  }

  private async _poll(): Promise<void> {
    try {
      const overview = await this.api.overview();
      this.overview = overview;
      this.error = null;
      for (const vgpu of overview.vgpus ?? []) {
        await this._record(vgpu, overview.time);
        if (this.wantTrace) {
          await this._loadTrace(vgpu.id);
        }
      }
    } catch (err) {
      this.error = err instanceof ApiError ? err.message : String(err);
    }
    this._changed.emit();
  }

  private async _record(vgpu: VGPU, time: number): Promise<void> {
    let samples = this._history.get(vgpu.id);
    if (samples === undefined) {
      samples = [];
      try {
        samples = await this.api.history(vgpu.id);
      } catch {
        // no past yet: the chart starts with this poll
      }
      this._history.set(vgpu.id, samples);
    }
    const tiers = vgpu.tiers ?? { hot: vgpu.used, warm: 0, cold: 0 };
    const last = samples[samples.length - 1];
    if (last === undefined || time > last.t) {
      samples.push({
        t: time,
        hot: tiers.hot,
        warm: tiers.warm,
        cold: tiers.cold,
        used: vgpu.used,
        overhead: vgpu.overhead,
        quota: vgpu.quota,
        share: vgpu.share,
        share_measured: vgpu.share_measured
      });
    }
    if (samples.length > MAX_SAMPLES) {
      samples.splice(0, samples.length - MAX_SAMPLES);
    }
  }

  private async _loadTrace(id: string): Promise<void> {
    try {
      this._trace.set(id, await this.api.trace(id, 20));
    } catch {
      // the calls list keeps its last look; the poll's own error line says what is wrong
    }
  }

  private _changed = new Signal<this, void>(this);
  private _history = new Map<string, Sample[]>();
  private _trace = new Map<string, TraceRecord[]>();
  private _interval = 5000;
  private _timer = 0;
  private _busy = false;
  private _again = false;
  private _stopped = true;
}
