/**
 * The JupyterLab plugin: one poller (model.ts) feeding the status bar item and the side panel, its
 * interval from the settings (schema/plugin.json, refreshInterval in seconds).
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { VgpuApi } from './api';
import { VgpuModel } from './model';
import { VgpuPanel } from './panel';
import { VgpuStatus } from './statusbar';

const PLUGIN_ID = '@gpulab/vgpu-panel:plugin';
const OPEN = 'gpulab:open-vgpu-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'The vGPU of this server: usage, charts and tier controls.',
  autoStart: true,
  requires: [ILabShell],
  optional: [IStatusBar, ISettingRegistry, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    statusBar: IStatusBar | null,
    settings: ISettingRegistry | null,
    palette: ICommandPalette | null
  ) => {
    const model = new VgpuModel(new VgpuApi());
    const panel = new VgpuPanel(model);
    shell.add(panel, 'right', { rank: 900, type: 'vGPU' });

    app.commands.addCommand(OPEN, {
      label: 'Open the vGPU panel',
      execute: () => shell.activateById(panel.id)
    });
    palette?.addItem({ command: OPEN, category: 'vGPU' });

    if (statusBar) {
      const item = new VgpuStatus(model, () => void app.commands.execute(OPEN));
      statusBar.registerStatusItem(PLUGIN_ID, {
        item,
        align: 'left',
        rank: 50,
        isActive: () => item.active,
        activeStateChanged: item.activeChanged
      });
    }

    if (settings) {
      const apply = (s: ISettingRegistry.ISettings) => {
        model.interval = s.get('refreshInterval').composite as number;
      };
      settings
        .load(PLUGIN_ID)
        .then(s => {
          apply(s);
          s.changed.connect(changed => {
            apply(changed);
            void model.refresh();
          });
        })
        .catch(reason => console.warn(`vGPU panel: the settings could not be read (${reason}); polling every 5 s`))
        .finally(() => model.start());
    } else {
      model.start();
    }
  }
};

export default plugin;
