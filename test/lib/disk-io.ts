/**
 * Reading and writing disks in tests of both tiers: a command's output, a known 4 KiB block per
 * index, positioned reads and synced writes, a file's sha256, a directory's sorted names.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  fsyncSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';

export const MiB = 1024 * 1024;

/** A command's stdout, trimmed; throws on a non-zero exit. LVM's warnings about inherited descriptors are off. */
export function sh(file: string, args: string[]): string {
  return execFileSync(file, args, {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, LVM_SUPPRESS_FD_WARNINGS: '1' },
  }).trim();
}

/** 4 KiB that only block `i` of `salt` has. */
export function block(i: number, salt: string): Buffer {
  const parts: Buffer[] = [];
  let h = createHash('sha256').update(`${salt}:${i}`).digest();
  while (parts.length * 32 < 4096) {
    parts.push(h);
    h = createHash('sha256').update(h).digest();
  }
  return Buffer.concat(parts).subarray(0, 4096);
}

export function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

export function pread(path: string, offset: number, length = 4096): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    assert.equal(readSync(fd, buf, 0, length, offset), length, `short read from ${path}`);
    return buf;
  } finally {
    closeSync(fd);
  }
}

export function pwrite(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export function listDir(d: string): string[] {
  try {
    return readdirSync(d).sort();
  } catch {
    return [];
  }
}

/** A sparse image of `mib` MiB with block(i, salt) at the start of every MiB i; returns its sha256. */
export function patternedImage(path: string, mib: number, salt: string): string {
  writeFileSync(path, '');
  truncateSync(path, mib * MiB);
  const fd = openSync(path, 'r+');
  try {
    for (let i = 0; i < mib; i++) writeSync(fd, block(i, salt), 0, 4096, i * MiB);
  } finally {
    closeSync(fd);
  }
  return sha256File(path);
}
