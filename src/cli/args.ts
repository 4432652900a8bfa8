/**
 * Command-line options for `xen-blockhooks` commands: `--name value`, `--name=value`, `-x value`,
 * `-xvalue`, boolean flags, `--` ends options. Unknown options, missing or empty values and numbers
 * outside an option's range are usage errors (exit 2), each naming the option.
 *
 * Node's own `util.parseArgs` splits the command line; this file only adds what it cannot say:
 *   - whole numbers and their ranges (`int`, `min`, `max`): parseArgs knows strings and booleans;
 *   - an argument that looks like a negative number (`grow web xvda -1G`, `--timeout -5`) is an
 *     argument or a value: strict mode would take `-1G` for the options -1 -G and refuse
 *     `--timeout -5` as "ambiguous". So parseArgs runs with strict: false and the tokens it returns
 *     are checked here instead: an option no spec names is refused, a flag given a value is refused,
 *     an option that needs a value and has none is refused;
 *   - our messages (`option --timeout must be at least 1 second, not 0`) instead of parseArgs's
 *     error codes, and "given twice" for an option that may be given once.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { UsageError } from '../disk/errors.js';

export interface OptionSpec {
  /** Long name without dashes. */
  name: string;
  short?: string;
  /** `flag` takes no value. */
  type: 'flag' | 'string' | 'int';
  /** May be given several times (values collected in order). */
  repeat?: boolean;
  /** int: the smallest and the largest value that makes sense; anything else is a usage error naming the option. */
  min?: number;
  max?: number;
  /** int: what the number counts, for the message (`ms`, `seconds`). */
  unit?: string;
}

export interface Parsed {
  options: Record<string, string | number | boolean | (string | number)[]>;
  positional: string[];
}

function intValue(spec: OptionSpec, v: string): number {
  if (!/^\d+$/.test(v)) throw new UsageError(`option --${spec.name} needs a whole number, not "${v}"`);
  const value = Number(v);
  const unit = (n: number) =>
    !spec.unit ? '' : ` ${n === 1 && /^\w{3,}s$/.test(spec.unit) ? spec.unit.slice(0, -1) : spec.unit}`;
  if (spec.min !== undefined && value < spec.min)
    throw new UsageError(`option --${spec.name} must be at least ${spec.min}${unit(spec.min)}, not ${v}`);
  if (spec.max !== undefined && value > spec.max)
    throw new UsageError(`option --${spec.name} must be at most ${spec.max}${unit(spec.max)}, not ${v}`);
  return value;
}

export function parseOptions(argv: readonly string[], specs: readonly OptionSpec[]): Parsed {
  const byName = new Map(specs.map((s) => [s.name, s]));
  const options: NonNullable<ParseArgsConfig['options']> = {};
  for (const s of specs) {
    options[s.name] = {
      type: s.type === 'flag' ? 'boolean' : 'string',
      ...(s.short ? { short: s.short } : {}),
      ...(s.repeat ? { multiple: true } : {}),
    };
  }
  const { tokens } = parseArgs({ args: [...argv], options, strict: false, allowPositionals: true, tokens: true });
  const parsed: Parsed = { options: {}, positional: [] };
  const negativeArgs = new Set<number>();
  for (const tok of tokens) {
    if (tok.kind === 'positional') {
      parsed.positional.push(tok.value);
      continue;
    }
    if (tok.kind === 'option-terminator') continue;
    const spec = byName.get(tok.name);
    if (!spec) {
      // `-1G` comes back as the options -1 and -G (one token each, the same index): one argument.
      const raw = argv[tok.index] as string;
      if (/^-\d/.test(raw)) {
        if (!negativeArgs.has(tok.index)) parsed.positional.push(raw);
        negativeArgs.add(tok.index);
        continue;
      }
      throw new UsageError(`unknown option ${tok.rawName}`);
    }
    let value: string | number | boolean;
    if (spec.type === 'flag') {
      if (tok.value !== undefined) throw new UsageError(`option --${spec.name} takes no value`);
      value = true;
    } else {
      if (tok.value === undefined) throw new UsageError(`option --${spec.name} needs a value`);
      if (spec.type === 'int') value = intValue(spec, tok.value);
      else if (tok.value === '') throw new UsageError(`option --${spec.name} needs a value, not an empty string`);
      else value = tok.value;
    }
    if (spec.repeat) {
      const list = (parsed.options[spec.name] as (string | number)[] | undefined) ?? [];
      list.push(value as string | number);
      parsed.options[spec.name] = list;
    } else {
      if (parsed.options[spec.name] !== undefined && spec.type !== 'flag')
        throw new UsageError(`option --${spec.name} given twice`);
      parsed.options[spec.name] = value;
    }
  }
  return parsed;
}

export function str(p: Parsed, name: string): string | undefined {
  const v = p.options[name];
  return typeof v === 'string' ? v : undefined;
}
export function int(p: Parsed, name: string): number | undefined {
  const v = p.options[name];
  return typeof v === 'number' ? v : undefined;
}
export function flag(p: Parsed, name: string): boolean {
  return p.options[name] === true;
}
/** Every value of a repeatable string option, in the order given (empty when absent). */
export function strs(p: Parsed, name: string): string[] {
  const v = p.options[name];
  return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : typeof v === 'string' ? [v] : [];
}
