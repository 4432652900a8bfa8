// Runs inside the test guest (started by guest-init.sh with the host's own node): reads the
// plan from the results share, runs each job with a clean environment, and after each one
// records and then clears whatever device-mapper, loop and nbd state it left behind, and
// empties the scratch folder. Only Node builtins: this file is copied into the share as is.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const SHARE = '/xbh-share';
const SCRATCH = '/scratch';
const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

const plan = JSON.parse(readFileSync(join(SHARE, 'plan.json'), 'utf8'));
const cleanEnv = { PATH, HOME: '/root', DM_DISABLE_UDEV: '1', XEN_BLOCKHOOKS_SCRATCH: SCRATCH, ...plan.env };

function tool(file, args) {
  const r = spawnSync(file, args, { encoding: 'utf8', env: { PATH, DM_DISABLE_UDEV: '1' }, timeout: 30_000 });
  return { ok: r.status === 0, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}`.trim() };
}

function connectedNbds() {
  return readdirSync('/sys/block').filter((d) => d.startsWith('nbd') && existsSync(`/sys/block/${d}/pid`));
}

/** Device state a test left behind, as readable lines (empty when clean). */
function leftovers() {
  const out = [];
  const dm = tool('dmsetup', ['ls']);
  if (dm.out && !/No devices found/.test(dm.out)) out.push(`dmsetup ls:\n${dm.out}`);
  const loop = tool('losetup', ['-a']);
  if (loop.out) out.push(`losetup -a:\n${loop.out}`);
  const nbd = connectedNbds();
  if (nbd.length) out.push(`connected nbd: ${nbd.join(' ')}`);
  return out;
}

function reset() {
  tool('dmsetup', ['remove_all', '-f']);
  for (const n of connectedNbds()) tool('qemu-nbd', ['-d', `/dev/${n}`]);
  tool('losetup', ['-D']);
  for (const f of readdirSync(SCRATCH)) rmSync(join(SCRATCH, f), { recursive: true, force: true });
}

function runJob(job) {
  return new Promise((resolve) => {
    const base = join(SHARE, 'results', job.id);
    const stdout = openSync(`${base}.stdout`, 'w');
    const stderr = openSync(`${base}.stderr`, 'w');
    const t0 = Date.now();
    console.log(`xbh-agent: run ${job.label}`);
    const child = spawn(job.argv[0], job.argv.slice(1), {
      cwd: plan.cwd,
      env: cleanEnv,
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    const tee = (fd, sink) => (d) => {
      writeFileSync(fd, d);
      if (plan.echo) sink.write(d);
    };
    child.stdout.on('data', tee(stdout, process.stdout));
    child.stderr.on('data', tee(stderr, process.stderr));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {}
    }, plan.fileTimeoutMs);
    const finish = (exitCode, signal, error) => {
      clearTimeout(timer);
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {} // stray background children of the test
      resolve({ exitCode, signal, error, timedOut, durationMs: Date.now() - t0 });
    };
    child.on('error', (e) => finish(null, null, String(e)));
    child.on('close', (code, signal) => finish(code, signal, undefined));
  });
}

console.log(`xbh-agent: ready (${plan.jobs.length} job(s))`);
for (const job of plan.jobs) {
  reset();
  const result = await runJob(job);
  result.leftovers = leftovers();
  result.scratchLeft = readdirSync(SCRATCH); // removed below; reported, not a failure
  reset();
  const still = leftovers();
  if (still.length) result.resetFailed = still;
  writeFileSync(join(SHARE, 'results', `${job.id}.json`), JSON.stringify(result));
  console.log(
    `xbh-agent: done ${job.label}: exit ${result.exitCode ?? result.signal}${result.timedOut ? ' (timed out)' : ''}`,
  );
}
if (plan.shell) {
  console.log('xbh-agent: shell (exit it to power off)');
  const tty = openSync('/dev/ttyS0', 'r+');
  spawnSync('setsid', ['-c', '-w', '/bin/bash', '-i'], {
    cwd: plan.cwd,
    env: { ...cleanEnv, TERM: 'linux' },
    stdio: [tty, tty, tty],
  });
}
writeFileSync(join(SHARE, 'done'), 'ok\n');
