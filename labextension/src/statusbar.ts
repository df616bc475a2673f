/**
 * The status bar item: "vGPU 3.1 / 8 GiB · hot" (used plus context overhead, of the quota, and the
 * tier). Absent on a server without a vGPU; a click opens the panel.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { VGPU } from './api';
import { usedOfQuota } from './format';
import { VgpuModel } from './model';

/** The item's text for one vGPU, shared with the panel's heading. */
export function statusText(vgpu: VGPU): string {
  const tier = vgpu.tier && vgpu.tier !== 'none' ? ` · ${vgpu.tier}` : '';
  return `vGPU ${usedOfQuota(vgpu.used + vgpu.overhead, vgpu.quota)}${tier}`;
}

export class VgpuStatus extends Widget {
  constructor(
    private readonly model: VgpuModel,
    open: () => void
  ) {
    super();
    this.addClass('gpulab-status');
    this.node.dataset.testid = 'gpulab-status';
    this.node.title = 'vGPU: open the panel';
    this.node.addEventListener('click', open);
    model.changed.connect(this.render, this);
    this.render();
  }

  /** Whether the item belongs in the status bar: only when the server has a vGPU. */
  get active(): boolean {
    return (this.model.overview?.configured ?? false) && (this.model.overview?.vgpus?.length ?? 0) > 0;
  }

  get activeChanged(): ISignal<this, void> {
    return this._activeChanged;
  }

  dispose(): void {
    this.model.changed.disconnect(this.render, this);
    super.dispose();
  }

  private render(): void {
    const active = this.active;
    if (active !== this._wasActive) {
      this._wasActive = active;
      this._activeChanged.emit();
    }
    if (!active) {
      this.node.textContent = '';
      return;
    }
    const vgpus = this.model.overview!.vgpus;
    let text = statusText(vgpus[0]);
    if (vgpus.length > 1) {
      text += ` (+${vgpus.length - 1} more)`;
    }
    if (this.model.error) {
      text += ' · ?';
      this.node.title = this.model.error;
    } else {
      this.node.title = 'vGPU: open the panel';
    }
    this.node.textContent = text;
  }

  private _wasActive = false;
  private _activeChanged = new Signal<this, void>(this);
}
