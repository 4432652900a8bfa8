// ESLint for the whole tree (npm run lint runs it, then prettier --check; CI runs both): the recommended rules of ESLint and of
// typescript-eslint, Node's globals, and two local choices: an unused argument may be named
// _like_this (an interface's parameter a fake does not need), and an empty catch is allowed (a
// probe whose failure means "no"). Layout is Prettier's (.prettierrc.json): eslint-config-prettier
// turns off every rule that would argue with it.
import js from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';
import prettierOff from 'eslint-config-prettier';

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/', '.cache/', 'coverage/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { ...globals.node, __XEN_BLOCKHOOKS_VERSION__: 'readonly' } },
    rules: {
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' },
      ],
      'no-empty': ['error', { allowEmptyCatch: true }],
    },
  },
  prettierOff,
  {
    files: ['**/*.cjs'],
    languageOptions: { sourceType: 'commonjs' },
    rules: { '@typescript-eslint/no-require-imports': 'off' },
  },
);
