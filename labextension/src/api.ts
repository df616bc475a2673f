/**
 * The server extension's REST API ({base_url}gpulab/api/) as typed calls.
 *
 * Every URL starts from ServerConnection.makeSettings().baseUrl, so the same build works at "/" and
 * under a hub's "/user/<name>/" prefix; the settings also carry the XSRF token and the hub's auth.
 * A failed call raises ApiError with the server's own sentence, which the panel shows as it is.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export type Tier = 'hot' | 'warm' | 'cold';
export type Tiers = Record<Tier, number>;

export interface KernelUse {
  kernel_id: string;
  name: string;
  notebook: string | null;
  execution_state: string;
  pids: number[];
  used: number;
  overhead: number;
  calls: number;
}

export interface ProcessUse {
  pid: number;
  client_pid: number;
  used: number;
  overhead: number;
  calls: number;
  tiers?: Tiers;
}

export interface Action {
  id: string;
  vgpu: string;
  kind: 'offload' | 'restore';
  to: Tier;
  state: 'running' | 'done' | 'failed';
  started: number;
  updated: number;
  elapsed: number;
  tiers: Tiers;
  status: number | null;
  message: string | null;
}

export interface VGPU {
  id: string;
  user: string;
  profile: string;
  worker: string;
  gpus: string[];
  quota: number;
  compute: number;
  state: string;
  reason: string | null;
  used: number;
  overhead: number;
  share: number | null;
  share_measured: number | null;
  tier: 'none' | Tier | 'mixed';
  tiers: Tiers;
  calls: number;
  kernels: KernelUse[];
  other_processes: ProcessUse[];
  action: Action | null;
}

export interface GPU {
  uuid: string;
  index: number;
  model: string;
  memory: number;
  emulated: boolean;
}

export interface Overview {
  configured: boolean;
  message: string | null;
  emulated?: boolean;
  vgpus: VGPU[];
  gpus: GPU[];
  time: number;
  refresh?: number;
  background_refresh?: number;
}

export interface Sample {
  t: number;
  hot: number;
  warm: number;
  cold: number;
  used: number;
  overhead: number;
  quota: number;
  share: number | null;
  share_measured: number | null;
}

export interface TraceRecord {
  seq: number;
  time: number;
  pid: number;
  function: string;
  duration: number;
  bytes: number;
  result: number;
  error: string;
}

/** A refused or failed call: `message` is the sentence for the person. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly body: any = null
  ) {
    super(message);
  }
}

/** Calls to the server extension; one instance per JupyterLab page. */
export class VgpuApi {
  private readonly settings = ServerConnection.makeSettings();

  /** The full URL of a route under gpulab/api/. */
  url(...parts: string[]): string {
    return URLExt.join(this.settings.baseUrl, 'gpulab', 'api', ...parts);
  }

  overview(): Promise<Overview> {
    return this.call('GET', this.url('vgpus'));
  }

  async history(id: string): Promise<Sample[]> {
    const body = await this.call('GET', this.url('vgpus', enc(id), 'history'));
    return body.samples ?? [];
  }

  async trace(id: string, limit = 20): Promise<TraceRecord[]> {
    const body = await this.call('GET', this.url('vgpus', enc(id), 'trace') + `?limit=${limit}`);
    return body.records ?? [];
  }

  async offload(id: string, to: 'warm' | 'cold'): Promise<Action> {
    const body = await this.call('POST', this.url('vgpus', enc(id), 'offload'), { to });
    return body.action;
  }

  async restore(id: string): Promise<Action> {
    const body = await this.call('POST', this.url('vgpus', enc(id), 'restore'), {});
    return body.action;
  }

  action(actionId: string): Promise<Action> {
    return this.call('GET', this.url('actions', enc(actionId)));
  }

  private async call(method: string, url: string, body?: unknown): Promise<any> {
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { 'Content-Type': 'application/json' };
    }
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.settings);
    } catch (err) {
      throw new ApiError(0, `cannot reach this Jupyter server: ${(err as Error).message}`);
    }
    const text = await response.text();
    let data: any = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const sentence =
        (data && typeof data.message === 'string' && data.message) ||
        `the server answered ${response.status} ${response.statusText} for ${method} ${url}`;
      throw new ApiError(response.status, sentence, data);
    }
    return data;
  }
}

function enc(part: string): string {
  return encodeURIComponent(part);
}
