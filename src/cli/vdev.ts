/**
 * A guest disk name → the device number libxl uses as `<devid>` in the backend path and as
 * `virtual-device` in the frontend (libxl_device.c, `libxl__device_disk_dev_number`):
 *
 *   xvd<disk>[<part>]   disk < 16 and part < 16: (202 << 8) | (disk << 4) | part
 *                       otherwise (extended):    (1 << 28) | (disk << 8) | part   (disk < 2^20, part ≤ 255)
 *   hd<disk>[<part>]    disk < 4, part < 64:     (major << 8) | ((disk & 1) << 6) | part, major 3 for hda/hdb, 22 for hdc/hdd
 *   sd<disk>[<part>]    disk < 16, part < 16:    (8 << 8) | (disk << 4) | part
 *   d<N>[p<M>]          as xvd with disk N, part M
 *   <number>            the number itself
 *
 * Disk letters count like spreadsheet columns (a = 0, z = 25, aa = 26); a partition number has no
 * leading zero. xvda → 51712, xvdb1 → 51729, sda1 → 2049, hdc → 5632.
 */

export class VdevError extends Error {
  override name = 'VdevError';
}

function letters(s: string): number | undefined {
  if (!/^[a-z]+$/.test(s)) return undefined;
  let n = 0;
  for (const c of s) {
    n = n * 26 + (c.charCodeAt(0) - 96);
    if (n > 1 << 21) return undefined;
  }
  return n - 1;
}

function partition(s: string): number | undefined {
  if (s === '') return 0;
  if (!/^[1-9]\d{0,3}$/.test(s)) return undefined;
  return Number(s);
}

function xvd(disk: number, part: number, vdev: string): number {
  if (disk <= 15 && part <= 15) return (202 << 8) | (disk << 4) | part;
  if (disk >= 1 << 20 || part > 255)
    throw new VdevError(`vdev "${vdev}" is out of range (xvd disks up to 2^20, partitions up to 255)`);
  return ((1 << 28) | (disk << 8) | part) >>> 0;
}

export function vdevToDevid(vdev: string): number {
  const v = vdev.trim();
  if (/^\d+$/.test(v)) {
    const n = Number(v);
    if (n > 0xffffffff) throw new VdevError(`vdev "${vdev}" is too large for a device number`);
    return n;
  }
  let m = /^xvd([a-z]+)(\d*)$/.exec(v);
  if (m) {
    const disk = letters(m[1] as string);
    const part = partition(m[2] as string);
    if (disk !== undefined && part !== undefined) return xvd(disk, part, vdev);
  }
  m = /^hd([a-z]+)(\d*)$/.exec(v);
  if (m) {
    const disk = letters(m[1] as string);
    const part = partition(m[2] as string);
    if (disk !== undefined && part !== undefined) {
      if (disk > 3 || part > 63)
        throw new VdevError(`vdev "${vdev}" is out of range (hda to hdd, partitions up to 63)`);
      return (((disk < 2 ? 3 : 22) << 8) | ((disk & 1) << 6) | part) >>> 0;
    }
  }
  m = /^sd([a-z]+)(\d*)$/.exec(v);
  if (m) {
    const disk = letters(m[1] as string);
    const part = partition(m[2] as string);
    if (disk !== undefined && part !== undefined) {
      if (disk > 15 || part > 15)
        throw new VdevError(`vdev "${vdev}" is out of range (sda to sdp, partitions up to 15)`);
      return (8 << 8) | (disk << 4) | part;
    }
  }
  m = /^d(0|[1-9]\d*)(?:p([1-9]\d*))?$/.exec(v);
  if (m) {
    const disk = Number(m[1]);
    const part = m[2] === undefined ? 0 : Number(m[2]);
    if (disk < 1 << 20 && part <= 255) return xvd(disk, part, vdev);
    throw new VdevError(`vdev "${vdev}" is out of range (disks up to 2^20, partitions up to 255)`);
  }
  throw new VdevError(`vdev "${vdev}" is not a disk name libxl understands (xvda, xvdb1, hda, sda1, d0p1 or a number)`);
}
