/**
 * Steps and their undo. A backend's add is a sequence of `build.step(kind, data, doIt)` calls;
 * each is journaled before it runs, and each `kind` has an undoer registered by the backend that
 * knows how to take it away again from the recorded data alone (no closures survive a crash).
 */
import type { Journal, JournalEntry } from './journal.js';
import type { StepData, StepKind, StepRecord } from './step-data.js';
import type { Runner } from '../devices/runner.js';
import type { Logger } from '../log/logger.js';
import type { Config } from '../config/config.js';
import type { XenstoreClient } from '../xenstore/types.js';

export interface UndoContext {
  run: Runner;
  config: Config;
  log: Logger;
  journal: Journal;
  /** The record being undone (to look at its other steps or its disk). */
  entry: JournalEntry;
  /** Absent when xenstore is unreachable (remove and gc still work). */
  xs: XenstoreClient | undefined;
}

/** Undo one step. Must be idempotent, and must cope with `done: false` (the step may or may not have happened). */
export type Undoer<K extends StepKind = StepKind> = (step: StepRecord<K>, ctx: UndoContext) => Promise<void>;
/** A backend's undoers, by the kinds of step it records. */
export type UndoRegistry = { [K in StepKind]?: Undoer<K> };

/** The undoer of `step`'s kind in `registry`, typed for that step. */
function undoerOf(registry: UndoRegistry, step: StepRecord): Undoer | undefined {
  return registry[step.kind] as Undoer | undefined;
}

/** A build stopped before its next step because its `stopped` test said so (see Build). */
export class BuildStopped extends Error {
  constructor(readonly nextStep: string) {
    super(`stopped before step ${nextStep}: the event's caller is gone`);
    this.name = 'BuildStopped';
  }
}

export class Build {
  /**
   * `before`: record new steps in front of the step at this index instead of at the end (a
   * finished record that gains a device under one it already has: the new device must be undone
   * after the one that uses it, and undo runs newest first).
   * `stopped`: asked before each step; once it says true, the step throws BuildStopped instead of
   * running (the caller then undoes what was built, as after any failure).
   */
  constructor(
    readonly entry: JournalEntry,
    private readonly journal: Journal,
    private before?: number,
    private readonly stopped?: () => boolean,
  ) {}

  /**
   * Record `kind` with `data`, run `doIt`, merge what it returns into the record, mark it done.
   * If `doIt` throws, the record stays (done: false) for the rollback to undo whatever part of it happened.
   * `doIt` gets `note`, which adds facts to this step's record and saves it at once (e.g. a device
   * chosen before the command that uses it runs).
   */
  async step<K extends StepKind, R>(
    kind: K,
    data: StepData<K>,
    doIt: (note: (facts: Partial<StepData<K>>) => void) => Promise<R>,
    recordResult?: (r: R) => Partial<StepData<K>>,
  ): Promise<R> {
    if (this.stopped?.()) throw new BuildStopped(kind);
    const rec = { kind, data: { ...data }, done: false } as StepRecord<K>;
    if (this.before === undefined) this.entry.steps.push(rec);
    else this.entry.steps.splice(this.before++, 0, rec);
    this.journal.save(this.entry);
    const note = (facts: Partial<StepData<K>>): void => {
      Object.assign(rec.data, facts);
      this.journal.save(this.entry);
    };
    const r = await doIt(note);
    if (recordResult) Object.assign(rec.data, recordResult(r));
    rec.done = true;
    this.journal.save(this.entry);
    return r;
  }
}

/**
 * Undo every step of `entry`, newest first. Keeps going past a failing step and returns every
 * failure. Each undone step is dropped from the record as soon as it is gone, so a remove that is
 * itself killed resumes where it stopped. The record is deleted once nothing is left.
 */
export async function undoAll(
  entry: JournalEntry,
  registry: UndoRegistry,
  ctx: Omit<UndoContext, 'entry'>,
): Promise<Error[]> {
  const failures: Error[] = [];
  entry.phase = 'removing';
  entry.pid = process.pid;
  ctx.journal.save(entry);
  for (let i = entry.steps.length - 1; i >= 0; i--) {
    const step = entry.steps[i] as StepRecord;
    const undo = undoerOf(registry, step);
    if (!undo) {
      failures.push(new Error(`no undo known for step "${step.kind}" recorded by ${entry.script}`));
      continue;
    }
    try {
      await undo(step, { ...ctx, entry });
      entry.steps.splice(i, 1);
      ctx.journal.save(entry);
    } catch (e) {
      failures.push(e instanceof Error ? e : new Error(String(e)));
    }
  }
  if (failures.length === 0) ctx.journal.delete(entry.backendPath);
  else {
    entry.phase = 'failed';
    ctx.journal.save(entry);
  }
  return failures;
}
