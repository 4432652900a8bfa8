export * from './grow.js';
export * from './watch.js';
