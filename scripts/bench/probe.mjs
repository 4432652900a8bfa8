// Timing probe for the latency breakdown, loaded only by the benchmark with
// `node --import <this file> HOOK add|remove` and XBH_BENCH_PROBE_OUT=<json file>. It changes
// nothing the hook does: it watches every child process (spawn to exit, by command name) and the
// xenstore socket (time with at least one request unanswered, plus connecting), and on exit
// writes where the process's time went. The hook itself carries no timing code.
import cp from 'node:child_process';
import net from 'node:net';
import { writeFileSync } from 'node:fs';
import { basename } from 'node:path';

const out = process.env.XBH_BENCH_PROBE_OUT;
const probeStart = performance.now();
const children = [];
const xs = { busyMs: 0, requests: 0, connectMs: 0 };
const WATCH_EVENT = 15;
/** The first external action (a child or the xenstore connection): the end of load and set-up. */
let firstActivity;
const mark = () => {
  firstActivity ??= performance.now();
};

const origSpawn = cp.ChildProcess.prototype.spawn;
cp.ChildProcess.prototype.spawn = function spawnTimed(options) {
  mark();
  const start = performance.now();
  const r = origSpawn.call(this, options);
  const args = options?.args ?? [];
  this.once('exit', () =>
    children.push({
      cmd: basename(String(options?.file ?? '?')),
      arg: String(args[1] ?? ''),
      start,
      end: performance.now(),
    }),
  );
  return r;
};

/** Frames in a xenstore byte stream: header is type, req_id, tx_id, len (u32 LE each). */
function frameCounter() {
  let buf = Buffer.alloc(0);
  return (chunk, onFrame) => {
    buf = Buffer.concat([buf, chunk]);
    while (buf.length >= 16) {
      const len = buf.readUInt32LE(12);
      if (buf.length < 16 + len) break;
      onFrame(buf.readUInt32LE(0));
      buf = buf.subarray(16 + len);
    }
  };
}

const origConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function connectTimed(...args) {
  const o = args[0];
  const path = Array.isArray(o)
    ? o[0]?.path
    : typeof o === 'object' && o
      ? o.path
      : typeof o === 'string'
        ? o
        : undefined;
  const watch = Boolean(path && path === process.env.XENSTORED_PATH && !this.__xbhProbe);
  const c0 = performance.now();
  // connect() resets this.write, so the write hook goes on after it.
  const result = origConnect.apply(this, args);
  if (watch) {
    this.__xbhProbe = true;
    mark();
    this.once('connect', () => (xs.connectMs += performance.now() - c0));
    let outstanding = 0;
    let busySince = 0;
    const outFrames = frameCounter();
    const inFrames = frameCounter();
    const origWrite = this.write;
    this.write = function writeTimed(data, ...rest) {
      if (data instanceof Uint8Array) {
        outFrames(Buffer.from(data.buffer, data.byteOffset, data.byteLength), () => {
          xs.requests += 1;
          if (outstanding++ === 0) busySince = performance.now();
        });
      }
      return origWrite.call(this, data, ...rest);
    };
    this.prependListener('data', (chunk) => {
      inFrames(chunk, (type) => {
        if (type === WATCH_EVENT || outstanding === 0) return;
        if (--outstanding === 0) xs.busyMs += performance.now() - busySince;
      });
    });
  }
  return result;
};

process.on('exit', (code) => {
  if (!out) return;
  const exitAt = performance.now();
  const t = performance.nodeTiming;
  writeFileSync(
    out,
    JSON.stringify({
      code,
      timeOrigin: performance.timeOrigin,
      bootstrapMs: t.bootstrapComplete,
      probeStartMs: probeStart,
      firstActivityMs: firstActivity ?? exitAt,
      exitMs: exitAt,
      exitEpoch: performance.timeOrigin + exitAt,
      children,
      xenstore: xs,
    }),
  );
});
