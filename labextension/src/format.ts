/**
 * Numbers as the panel and the status bar write them: one place, so both say "3.1 / 8 GiB" alike.
 */
const KiB = 1024;
const MiB = KiB * 1024;
const GiB = MiB * 1024;

interface Unit {
  size: number;
  name: string;
}

/** The unit a figure of this size reads best in (a quota of 512 MiB stays in MiB). */
export function unitFor(bytes: number): Unit {
  if (bytes >= GiB) {
    return { size: GiB, name: 'GiB' };
  }
  if (bytes >= MiB) {
    return { size: MiB, name: 'MiB' };
  }
  return { size: KiB, name: 'KiB' };
}

/** At most one decimal, none for whole numbers: 8, 3.1, 0.5. */
export function number(value: number): string {
  const rounded = Math.round(value * 10) / 10;
  return Number.isInteger(rounded) ? String(rounded) : rounded.toFixed(1);
}

export function bytes(value: number): string {
  if (value <= 0) {
    return '0 B';
  }
  const unit = unitFor(value);
  return `${number(value / unit.size)} ${unit.name}`;
}

/** "3.1 / 8 GiB": both figures in the unit of the larger one (the quota). */
export function usedOfQuota(used: number, quota: number): string {
  const unit = unitFor(Math.max(quota, used, 1));
  return `${number(used / unit.size)} / ${number(quota / unit.size)} ${unit.name}`;
}

/** The worker gives shares in percent of one GPU ("share": 25 is a quarter). */
export function percent(value: number | null | undefined): string {
  if (value === null || value === undefined || Number.isNaN(value)) {
    return '–';
  }
  return `${number(value)}%`;
}

export function seconds(value: number): string {
  return value < 10 ? `${value.toFixed(1)} s` : `${Math.round(value)} s`;
}

export function clock(epoch: number): string {
  return new Date(epoch * 1000).toLocaleTimeString();
}
