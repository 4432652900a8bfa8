#!/usr/bin/env node
'use strict';
/**
 * Builds a startup snapshot of one hook bundle with the Node that runs this file:
 *
 *   node snapshot.cjs <dir>/<name>.cjs <dir>/<name>.snapshot [RUN-AS]
 *
 * RUN-AS is the bundle's path when it runs, if not the one given (the installer stages into a
 * DESTDIR); the bundle's __filename is that path.
 *
 * A hook's start-up is most of its time: Node bootstraps itself, then runs the module bodies of
 * the bundle (winston, the hook). A startup snapshot (`node --build-snapshot`, Node 18.8
 * and later) is V8's heap after all of that, written to a file; `node --snapshot-blob FILE -- ARGS`
 * starts from it and calls the hook at once. Debian's own nodejs is built without Node's built-in
 * snapshot, so there the snapshot also saves Node's own bootstrap.
 *
 * Rules, because a snapshot is only valid for the Node that made it (another Node crashes on it,
 * before any JavaScript runs):
 * - The snapshot is made here, by the Node that will run it (the installer runs this file with
 *   the node the wrappers exec), and checked by starting it once (`-- --version`) before it is
 *   renamed into place. Anything wrong leaves no snapshot and exit 1: the hook then starts
 *   through its code cache (<name>.mjs), as it would without this step.
 * - Beside it, <name>.snapshot.node (and .lib when Node runs on a shared libnode) carry the
 *   modification time of the node binary (and of libnode). The wrapper uses the snapshot only
 *   while those times still match (`test -nt`/`-ot`, no process), so an upgraded nodejs falls
 *   back to the code cache until the installer runs again.
 * - Node 18 cannot keep child_process, net or tty in a snapshot (their native parts crash the
 *   serializer). The bundle gets stand-ins for them that load the real module on first use, at
 *   run time. Reading one of them while the snapshot is built would bake in an answer: any such
 *   read fails the build.
 *
 * On success prints `node <path>` and, when there is one, `lib <path>`: the files the stamps copy.
 */
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

/** The snapshot's entry: the bundle wrapped as a CommonJS module, with the stand-ins. */
function entrySource(bundle, source) {
  return `'use strict';
(function () {
  const LAZY = new Set(['child_process', 'net', 'tty', 'node:child_process', 'node:net', 'node:tty']);
  let building = true;
  const reads = [];
  const standIn = (id) => {
    let real;
    // This require is the snapshot builder's: it warns "built-in module ... is not yet supported in
    // user snapshots" even at run time, on the hook's stderr, which xl prints to its user. The
    // module is loaded at run time on purpose: that one warning is dropped, every other stays.
    const load = () => {
      if (real !== undefined) return real;
      const emit = process.emitWarning;
      process.emitWarning = function (w, ...rest) {
        if (/is not yet supported in user snapshots/.test(String(w && w.message !== undefined ? w.message : w))) return;
        return emit.call(process, w, ...rest);
      };
      try {
        real = require(id);
      } finally {
        process.emitWarning = emit;
      }
      return real;
    };
    return new Proxy({}, {
      get(_t, k) {
        if (building) {
          reads.push(id + '.' + String(k));
          return undefined;
        }
        return load()[k];
      },
      has: (_t, k) => !building && k in load(),
      ownKeys: () => (building ? [] : Reflect.ownKeys(load())),
      getOwnPropertyDescriptor(_t, k) {
        if (building) return undefined;
        const d = Reflect.getOwnPropertyDescriptor(load(), k);
        if (d) d.configurable = true;
        return d;
      },
    });
  };
  let main;
  globalThis.__xbhSnapshot = { setMain: (m) => { main = m; } };
  const mod = { exports: {} };
  (function (exports, require, module, __filename, __dirname) {
${source}
  })(mod.exports, (id) => (LAZY.has(id) ? standIn(id) : require(id)), mod, ${JSON.stringify(bundle)}, ${JSON.stringify(path.dirname(bundle))});
  delete globalThis.__xbhSnapshot;
  building = false;
  if (reads.length > 0) throw new Error('the bundle reads ' + reads.join(', ') + ' while it loads; it cannot be kept in a snapshot');
  if (main === undefined) throw new Error('the bundle did not hand over a main function (not a hook?)');
  require('node:v8').startupSnapshot.setDeserializeMainFunction(main);
})();
`;
}

/** Files of the running Node whose change makes a snapshot invalid. */
function nodeFiles() {
  const files = { node: fs.realpathSync(process.execPath) };
  try {
    const lib = fs
      .readFileSync('/proc/self/maps', 'utf8')
      .split('\n')
      .map((l) => l.slice(l.indexOf('/')))
      .find((p) => /\/libnode\.so[.0-9]*$/.test(p));
    if (lib) files.lib = fs.realpathSync(lib);
  } catch {}
  return files;
}

function main(argv) {
  const [bundle, out, runAs] = argv;
  if (!bundle || !out || argv.length > 3) {
    process.stderr.write('usage: node snapshot.cjs BUNDLE.cjs OUT.snapshot [RUN-AS]\n');
    return 2;
  }
  const snapshotApi = require('node:v8').startupSnapshot;
  if (!snapshotApi) {
    process.stderr.write(`snapshot: node ${process.version} has no startup snapshots (needs 18.8 or later)\n`);
    return 1;
  }
  const absBundle = path.resolve(bundle);
  const tmp = `${out}.tmp.${process.pid}`;
  const entry = `${out}.entry.${process.pid}.cjs`;
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  delete env.NODE_PATH;
  try {
    fs.writeFileSync(entry, entrySource(runAs ? path.resolve(runAs) : absBundle, fs.readFileSync(absBundle, 'utf8')), {
      mode: 0o600,
    });
    execFileSync(process.execPath, ['--snapshot-blob', tmp, '--build-snapshot', entry], {
      env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const version = execFileSync(process.execPath, ['--snapshot-blob', tmp, '--', '--version'], {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    }).toString();
    if (!version.includes('(startup snapshot)'))
      throw new Error(`the snapshot started but answered --version with ${JSON.stringify(version.trim())}`);
    fs.chmodSync(tmp, 0o644);
    const files = nodeFiles();
    for (const [kind, file] of Object.entries(files)) {
      const stamp = `${out}.${kind}`;
      fs.writeFileSync(stamp, `${file}\n`, { mode: 0o644 });
      // touch -r copies the time to the nanosecond (fs.utimesSync rounds it), and sh's -nt/-ot compare nanoseconds.
      execFileSync('touch', ['-r', file, '--', stamp], { env, stdio: 'ignore' });
    }
    if (!files.lib) fs.rmSync(`${out}.lib`, { force: true });
    fs.renameSync(tmp, out);
    for (const [kind, file] of Object.entries(files)) process.stdout.write(`${kind} ${file}\n`);
    return 0;
  } catch (e) {
    // The child's error line (`Error: ...`), else its last line, else our own error.
    const lines = e && e.stderr ? String(e.stderr).trim().split('\n') : [];
    const why =
      lines.find((l) => /^[A-Za-z]*Error: /.test(l)) ?? lines.at(-1) ?? (e instanceof Error ? e.message : String(e));
    process.stderr.write(`snapshot: no startup snapshot for ${bundle} with node ${process.version}: ${why}\n`);
    return 1;
  } finally {
    fs.rmSync(entry, { force: true });
    fs.rmSync(tmp, { force: true });
  }
}

process.exitCode = main(process.argv.slice(2));
