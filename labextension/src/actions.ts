/**
 * A tier action from the panel's buttons: ask for confirmation, start it, and follow its progress
 * (GET actions/<id> every 0.5 s) until the server says it ended, reporting each look.
 *
 * The server runs the action; the page only watches, so closing the panel or the tab never leaves
 * a vGPU half moved. A second click while one runs follows the running one (the server's 409).
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';

import { Action, ApiError, VGPU, VgpuApi } from './api';
import { bytes } from './format';

export type TierRequest = 'warm' | 'cold' | 'restore';

/** Milliseconds between two looks at a running action. */
const FOLLOW_EVERY = 500;

interface Wording {
  title: string;
  body: (vgpu: VGPU) => string;
  accept: string;
}

export const WORDING: Record<TierRequest, Wording> = {
  warm: {
    title: 'Free GPU memory (keep kernel)',
    body: v =>
      `The GPU memory of this vGPU's programs (${bytes(v.tiers?.hot ?? v.used)} on the GPU) moves to the ` +
      "worker's host memory. Your kernels keep running with their variables; the next CUDA call that " +
      'touches the memory brings it back first, which takes a moment.',
    accept: 'Free GPU memory'
  },
  cold: {
    title: 'Move to disk',
    body: v =>
      `The GPU and host memory of this vGPU's programs (${bytes((v.tiers?.hot ?? 0) + (v.tiers?.warm ?? 0))}) ` +
      "moves to a file on the worker's disk. Your kernels keep running; the next CUDA call that touches " +
      'the memory reads it back, which takes longer than from host memory.',
    accept: 'Move to disk'
  },
  restore: {
    title: 'Restore',
    body: v =>
      `The memory moved off the GPU (${bytes((v.tiers?.warm ?? 0) + (v.tiers?.cold ?? 0))}) comes back to ` +
      'the GPU now, instead of at the next CUDA call that touches it.',
    accept: 'Restore'
  }
};

export async function confirm(request: TierRequest, vgpu: VGPU): Promise<boolean> {
  const words = WORDING[request];
  const result = await showDialog({
    title: words.title,
    body: words.body(vgpu),
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: words.accept })]
  });
  return result.button.accept;
}

/** Starts the action (or joins the one already running) and follows it to its end. */
export async function run(
  api: VgpuApi,
  vgpu: VGPU,
  request: TierRequest,
  progress: (action: Action) => void
): Promise<Action> {
  let action: Action;
  try {
    action = request === 'restore' ? await api.restore(vgpu.id) : await api.offload(vgpu.id, request);
  } catch (err) {
    if (err instanceof ApiError && err.status === 409 && err.body?.action) {
      action = err.body.action as Action;
    } else {
      throw err;
    }
  }
  progress(action);
  while (action.state === 'running') {
    await new Promise(resolve => window.setTimeout(resolve, FOLLOW_EVERY));
    action = await api.action(action.id);
    progress(action);
  }
  return action;
}
