/**
 * The side panel: every vGPU of this server (usually one), or the empty state that says why there
 * is none, or the server's sentence when it cannot reach the worker.
 */
import { Widget } from '@lumino/widgets';

import { vgpuIcon } from './icon';
import { VgpuModel } from './model';
import { VgpuView } from './vgpuview';

export class VgpuPanel extends Widget {
  constructor(private readonly model: VgpuModel) {
    super();
    this.id = 'gpulab-vgpu-panel';
    this.addClass('gpulab-panel');
    this.node.dataset.testid = 'gpulab-panel';
    this.title.icon = vgpuIcon;
    this.title.caption = 'vGPU';

    const header = document.createElement('h2');
    header.className = 'gpulab-title';
    header.textContent = 'vGPU';
    this.error.className = 'gpulab-error';
    this.error.dataset.testid = 'gpulab-error';
    this.error.hidden = true;
    this.empty.className = 'gpulab-empty';
    this.empty.dataset.testid = 'gpulab-empty';
    this.empty.hidden = true;
    this.loading.className = 'gpulab-loading';
    this.loading.textContent = 'Asking the server for its vGPU…';
    this.node.append(header, this.error, this.loading, this.empty, this.list);

    model.changed.connect(this.render, this);
  }

  dispose(): void {
    this.model.changed.disconnect(this.render, this);
    super.dispose();
  }

  protected onAfterShow(): void {
    this.model.wantTrace = true;
    void this.model.refresh();
  }

  protected onAfterHide(): void {
    this.model.wantTrace = false;
  }

  private render(): void {
    const overview = this.model.overview;
    this.error.hidden = this.model.error === null;
    this.error.textContent = this.model.error ?? '';
    if (overview === null) {
      return;
    }
    this.loading.hidden = true;
    const vgpus = overview.configured ? overview.vgpus ?? [] : [];
    this.empty.hidden = vgpus.length > 0;
    if (vgpus.length === 0) {
      this.empty.replaceChildren();
      const head = document.createElement('p');
      head.className = 'gpulab-empty-head';
      head.textContent = 'No vGPU on this server';
      const why = document.createElement('p');
      why.dataset.testid = 'gpulab-empty-message';
      why.textContent = overview.configured
        ? 'This server has a vGPU configuration, but the worker lists no vGPU for its session.'
        : overview.message ?? 'This Jupyter server was started without a vGPU.';
      this.empty.append(head, why);
    }
    const seen = new Set<string>();
    for (const vgpu of vgpus) {
      seen.add(vgpu.id);
      let view = this.views.get(vgpu.id);
      if (view === undefined) {
        view = new VgpuView(this.model, this.model.api, vgpu.id);
        this.views.set(vgpu.id, view);
        this.list.append(view.node);
      }
      view.update(vgpu, overview.gpus ?? []);
    }
    for (const [id, view] of this.views) {
      if (!seen.has(id)) {
        view.node.remove();
        this.views.delete(id);
      }
    }
  }

  private readonly error = document.createElement('div');
  private readonly empty = document.createElement('div');
  private readonly loading = document.createElement('div');
  private readonly list = document.createElement('div');
  private readonly views = new Map<string, VgpuView>();
}
