/**
 * The man pages in packaging/man: each renders with groff without a single warning, and says what
 * the program's own --help says: every subcommand and every option, long (`--select`) and short
 * (`-S`), a page names exists in the corresponding help, and every one the help names is on the
 * page. A short option quoted from another program is not ours: after that program's name
 * (`losetup -d`, `lvcreate -s -L`, `mount -o ro`), or a mount option list (`-o ro`). xen-blockhooks(8) is
 * compared command by command (its SYNOPSIS line and its DESCRIPTION entry against
 * `xen-blockhooks COMMAND --help`); a hook's page against the hook's --help (its actions and
 * options); an option written after "install" against `./install --help`;
 * xen-blockhooks-replace-block(8) against its --help; blockhooks.conf(5) names every key.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { cliMain, MAIN_HELP } from '../../src/cli/main.js';
import { HOOKS } from '../../src/backends/index.js';
import { helpText } from '../../src/hotplug/help.js';

const ROOT = join(import.meta.dirname, '../..');
const MAN = join(ROOT, 'packaging/man');
const PAGES = readdirSync(MAN)
  .filter((f) => /\.[58]$/.test(f))
  .sort();
/** Pages that are not a hook's: the command's, the block replacement command's, the configuration's. */
const NOT_HOOKS = new Set(['xen-blockhooks.8', 'xen-blockhooks-replace-block.8', 'blockhooks.conf.5']);

/** Long options in plain text: `--name` not glued to a word before it (`NAME--incoming` is a domain name). */
function longOptions(text: string): Set<string> {
  return new Set([...text.matchAll(/(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]/g)].map((m) => m[0]));
}

/** Another program's name and the options (and their arguments) quoted after it, or a mount option list. */
const FOREIGN =
  /\b(?:losetup|qemu-nbd|mount|kpartx|lvcreate|lvremove|lvextend|dmsetup|dd)(?: +-[A-Za-z](?![\w-])(?: +[^\s-][^\s,;)]*)?)+|(?<![\w-])-o ro\b/g;

/** Short options in plain text: `-S` alone (not `-Sx`, `a-b` or `--s`), other programs' options left out. */
function shortOptions(text: string): Set<string> {
  return new Set([...text.replace(FOREIGN, ' ').matchAll(/(?<![\w-])-[A-Za-z](?![\w-])/g)].map((m) => m[0]));
}

/** Long and short options. */
function options(text: string): Set<string> {
  return new Set([...longOptions(text), ...shortOptions(text)]);
}

/** A roff request's arguments, quotes honoured. */
function args(s: string): string[] {
  return [...s.matchAll(/"([^"]*)"|(\S+)/g)].map((m) => m[1] ?? m[2] ?? '');
}

function unescape(s: string): string {
  return s
    .replace(/\\f[BIRP]/g, '')
    .replace(/\\-/g, '-')
    .replace(/\\\(em/g, '—')
    .replace(/\\&/g, '')
    .replace(/\\e/g, '\\');
}

interface Page {
  /** Plain text of each section, by name. */
  sections: Map<string, string>;
  /** SYNOPSIS entries (separated by .br). */
  synopsis: string[];
  /** DESCRIPTION entries `.TP` + `.B word`: word → its text. */
  entries: Map<string, string>;
}

/** Just enough of man(7) to read the text back: fonts dropped, alternating-font requests joined. */
function readPage(source: string): Page {
  const sections = new Map<string, string>();
  const synopsis: string[] = [''];
  const entries = new Map<string, string>();
  let section = '';
  let entry: string | undefined;
  let afterTP = false;
  for (const raw of source.split('\n')) {
    if (raw.startsWith('.\\"')) continue;
    const m = /^\.([A-Za-z]+)\s*(.*)$/.exec(raw);
    let text: string | undefined;
    if (m) {
      const [, req, rest] = m as unknown as [string, string, string];
      if (req === 'SH') {
        section = args(rest).join(' ');
        entry = undefined;
        continue;
      }
      if (req === 'TP') {
        afterTP = true;
        entry = undefined;
        continue;
      }
      if (req === 'PP' || req === 'LP' || req === 'P') {
        entry = undefined;
        continue;
      }
      if (req === 'br') {
        if (section === 'SYNOPSIS') synopsis.push('');
        continue;
      }
      if (req === 'B' || req === 'I') text = args(rest).join(' ');
      else if (/^(BR|RB|IR|RI|BI|IB)$/.test(req)) text = args(rest).join('');
      else continue;
    } else text = raw;
    text = unescape(text);
    if (afterTP && section === 'DESCRIPTION') {
      entry = text.trim();
      entries.set(entry, '');
    }
    afterTP = false;
    sections.set(section, `${sections.get(section) ?? ''}${text}\n`);
    if (section === 'SYNOPSIS') synopsis[synopsis.length - 1] += `${text} `;
    if (entry !== undefined && section === 'DESCRIPTION') entries.set(entry, `${entries.get(entry)}${text}\n`);
  }
  return { sections, synopsis: synopsis.map((s) => s.trim()).filter(Boolean), entries };
}

async function commandHelp(argv: string[]): Promise<string> {
  const out: string[] = [];
  const code = await cliMain(argv, {}, { out: (s) => out.push(s), err: () => {} });
  if (code !== 0) throw new Error(`${argv.join(' ')} exited ${code}`);
  return out.join('\n');
}

const installHelp = spawnSync('/bin/sh', [join(ROOT, 'install'), '--help'], { encoding: 'utf8' }).stdout;

/** Options written right after "install" (the installer's, not the program's), and the rest. */
function splitInstallOptions(text: string): { install: Set<string>; own: Set<string> } {
  const install = new Set<string>();
  const own = new Set<string>();
  for (const m of text.matchAll(/(\binstall\s+)?((?<![\w-])--[a-z][a-z0-9-]*[a-z0-9])/g))
    (m[1] ? install : own).add(m[2] as string);
  return { install, own };
}

const sorted = (s: Iterable<string>) => [...s].sort();
const minus = (a: Set<string>, b: Set<string>) => sorted([...a].filter((x) => !b.has(x)));

t.test('every page renders with groff -ww -man -Tutf8 without a warning', async (t) => {
  const probe = spawnSync('groff', ['--version'], { encoding: 'utf8' });
  t.equal(probe.status, 0, 'groff is installed (Debian: groff-base; scripts/setup.sh installs it)');
  if (probe.status !== 0) return;
  t.ok(PAGES.length >= 7, `the pages: ${PAGES.join(', ')}`);
  for (const page of PAGES) {
    const r = spawnSync('groff', ['-ww', '-man', '-Tutf8', join(MAN, page)], { encoding: 'utf8' });
    t.same({ status: r.status, warnings: r.stderr }, { status: 0, warnings: '' }, page);
    t.ok(r.stdout.length > 200, `${page} renders to text`);
  }
});

t.test('the test reads a page as groff does: its checks can fail', async (t) => {
  const p = readPage(
    '.SH SYNOPSIS\n.B x run\n.RB [ \\-\\-dry\\-run ]\n.br\n.B x stop\n.SH DESCRIPTION\n.TP\n.B run\nwith\n.IR NAME \\-\\-incoming\nand \\fB\\-\\-fast\\fR.\n.PP\nEvery command takes\n.BR \\-\\-help .\n',
  );
  t.same(p.synopsis, ['x run [--dry-run]', 'x stop']);
  t.same(sorted(p.entries.keys()), ['run']);
  t.same(
    sorted(longOptions(p.entries.get('run') ?? '')),
    ['--fast'],
    'NAME--incoming is no option; the paragraph after .PP is not the entry',
  );
  t.same(
    sorted(
      shortOptions(
        'status [-o F] [-S C], -h; losetup -d, qemu-nbd -d, (lvcreate -s -L); mount -o ro /x; with -o ro,noload; a-b -xy',
      ),
    ),
    ['-S', '-h', '-o'],
    "ours, not another program's",
  );
  t.same(splitInstallOptions('run install --replace-block, then --apply'), {
    install: new Set(['--replace-block']),
    own: new Set(['--apply']),
  });
});

t.test("xen-blockhooks(8) and the command's help name the same commands and options", async (t) => {
  const page = readPage(readFileSync(join(MAN, 'xen-blockhooks.8'), 'utf8'));
  const helpCommands = new Set(
    [
      ...MAIN_HELP.split('\n\n')
        .find((b) => b.startsWith('Commands:'))!
        .matchAll(/^ {2}([a-z]+)/gm),
    ].map((m) => m[1] as string),
  );
  const synopsisCommands = new Map(page.synopsis.map((s) => [/^xen-blockhooks ([a-z]+)/.exec(s)?.[1] ?? s, s]));
  const entryCommands = new Set(page.entries.keys());
  t.same(sorted(synopsisCommands.keys()), sorted(helpCommands), 'SYNOPSIS: the commands of "xen-blockhooks --help"');
  t.same(sorted(entryCommands), sorted(helpCommands), 'DESCRIPTION: an entry for each of them');
  const everyHelp = new Set<string>(['--help', '--version', '-h', '-V']);
  for (const cmd of sorted(helpCommands)) {
    const help = await commandHelp([cmd, '--help']);
    const inHelp = options(help);
    inHelp.delete('--help');
    inHelp.delete('-h');
    for (const o of options(help)) everyHelp.add(o);
    const onPage = options(`${synopsisCommands.get(cmd) ?? ''}\n${page.entries.get(cmd) ?? ''}`);
    onPage.delete('--help');
    onPage.delete('-h');
    t.same(
      { onPageOnly: minus(onPage, inHelp), inHelpOnly: minus(inHelp, onPage) },
      { onPageOnly: [], inHelpOnly: [] },
      `${cmd}: the page's options are "${cmd} --help"'s`,
    );
  }
  const all = splitInstallOptions([...page.sections.values()].join('\n'));
  t.same(minus(all.own, everyHelp), [], "every option anywhere on the page is one of the command's");
  t.same(
    minus(shortOptions([...page.sections.values()].join('\n')), everyHelp),
    [],
    "every short option anywhere on the page is one of the command's",
  );
  t.same(minus(all.install, longOptions(installHelp)), [], "every installer option on the page is the installer's");
});

t.test("each hook's page and the hook's --help name the same actions and options", async (t) => {
  const pageOf = (hook: string) => (hook === 'block' ? 'xen-blockhooks-block.8' : `${hook}.8`);
  t.same(
    sorted(PAGES.filter((p) => !NOT_HOOKS.has(p))),
    sorted(Object.keys(HOOKS).map(pageOf)),
    'a page for each hook, and no page for a hook that is not',
  );
  for (const [hook, backend] of Object.entries(HOOKS)) {
    const help = helpText(backend);
    const page = readPage(readFileSync(join(MAN, pageOf(hook)), 'utf8'));
    const actions = (text: string) =>
      new Set(
        text
          .split('\n')
          .map((l) => new RegExp(`^\\s*(?:Usage:\\s+)?${hook} ([a-z|]+)(?:\\s|$)`).exec(l)?.[1])
          .filter((a): a is string => a !== undefined)
          .flatMap((a) => a.split('|')),
      );
    t.same(
      sorted(actions(page.synopsis.join('\n'))),
      sorted(actions(help)),
      `${hook}: SYNOPSIS has the actions of its usage`,
    );
    const text = [...page.sections.values()].join('\n');
    const { install, own } = splitInstallOptions(text);
    const inHelp = longOptions(help);
    t.same(
      { onPageOnly: minus(own, inHelp), inHelpOnly: minus(inHelp, own) },
      { onPageOnly: [], inHelpOnly: [] },
      `${hook}: the page's options are "${hook} --help"'s`,
    );
    t.same(
      {
        onPageOnly: minus(shortOptions(text), shortOptions(help)),
        inHelpOnly: minus(shortOptions(help), shortOptions(text)),
      },
      { onPageOnly: [], inHelpOnly: [] },
      `${hook}: the page's short options are "${hook} --help"'s`,
    );
    t.same(
      minus(install, longOptions(installHelp)),
      [],
      `${hook}: the installer options on its page are the installer's`,
    );
  }
});

t.test(
  'xen-blockhooks-replace-block(8) and its --help name the same options; blockhooks.conf(5) every key',
  async (t) => {
    for (const p of NOT_HOOKS) t.ok(PAGES.includes(p), `${p} is there`);
    const r = spawnSync('/bin/sh', [join(ROOT, 'packaging/xen-blockhooks-replace-block'), '--help'], {
      encoding: 'utf8',
    });
    t.equal(r.status, 0, r.stderr);
    const page = readPage(readFileSync(join(MAN, 'xen-blockhooks-replace-block.8'), 'utf8'));
    const text = [...page.sections.values()].join('\n');
    const { install, own } = splitInstallOptions(text);
    const inHelp = longOptions(r.stdout);
    inHelp.delete('--help');
    t.same(
      { onPageOnly: minus(own, inHelp), inHelpOnly: minus(inHelp, own) },
      { onPageOnly: [], inHelpOnly: [] },
      "the page's options are its --help's",
    );
    const shortInHelp = shortOptions(r.stdout);
    shortInHelp.delete('-h');
    t.same(
      { onPageOnly: minus(shortOptions(text), shortInHelp), inHelpOnly: minus(shortInHelp, shortOptions(text)) },
      { onPageOnly: [], inHelpOnly: [] },
      "the page's short options are its --help's",
    );
    t.same(minus(install, longOptions(installHelp)), [], "the installer options on the page are the installer's");
    const { CONFIG_KEYS } = await import('../../src/config/config.js');
    const conf = [...readPage(readFileSync(join(MAN, 'blockhooks.conf.5'), 'utf8')).sections.values()].join('\n');
    for (const k of CONFIG_KEYS)
      t.match(conf, new RegExp(`(^|\\s)${k.replace(/\./g, '\\.')}(\\s|$)`, 'm'), `blockhooks.conf(5) names ${k}`);
  },
);

t.test("every state of status --help is on xen-blockhooks(8)'s status entry and in docs/cli.md", async (t) => {
  const help = await commandHelp(['status', '--help']);
  const block = help.split('States:\n')[1]?.split('\n\n')[0] ?? '';
  const states = [...block.matchAll(/^ {2}(\w+) {2,}/gm)].map((m) => m[1] as string);
  t.ok(states.includes('open') && states.includes('missing') && states.length >= 11, `states: ${states.join(' ')}`);
  const page = readPage(readFileSync(join(MAN, 'xen-blockhooks.8'), 'utf8')).entries.get('status') ?? '';
  const cli = readFileSync(join(ROOT, 'docs/cli.md'), 'utf8');
  const docs = cli.slice(cli.indexOf('\n## status'), cli.indexOf('\n## gc'));
  t.same(
    states.filter((s) => !new RegExp(`(^|\\s)${s}\\s`, 'm').test(page)),
    [],
    'on the page (each followed by what it means)',
  );
  t.same(
    states.filter((s) => !docs.includes(`\`${s}\``)),
    [],
    'in the status section of docs/cli.md',
  );
});
