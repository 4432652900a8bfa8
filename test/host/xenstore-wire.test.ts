import t from 'tap';
import {
  FrameDecoder,
  FrameTooLargeError,
  HEADER_SIZE,
  XsOp,
  encodeFrame,
  nulStrings,
  parseErrno,
  splitStrings,
  writePayload,
} from '../../src/xenstore/wire.js';
import { XENSTORE_PAYLOAD_MAX, XsError } from '../../src/xenstore/types.js';

t.test('header is four little-endian u32s followed by the payload', async (t) => {
  const buf = encodeFrame({ type: XsOp.WRITE, reqId: 0x01020304, txId: 7, payload: writePayload('a/b', 'v') });
  t.equal(buf.length, HEADER_SIZE + 5);
  t.same([...buf.subarray(0, 16)], [11, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 5, 0, 0, 0]);
  t.same(buf.subarray(16), Buffer.from('a/b\0v', 'latin1'));
});

t.test('payload encodings', async (t) => {
  t.same(nulStrings('/x', 'tok'), Buffer.from('/x\0tok\0'));
  t.same(nulStrings(''), Buffer.from([0]), 'TRANSACTION_START body is a single NUL');
  t.same(
    writePayload('/p', 'ün'),
    Buffer.concat([Buffer.from('/p\0'), Buffer.from('ün', 'utf8')]),
    'value not NUL-terminated',
  );
  t.same(writePayload('/p', ''), Buffer.from('/p\0'));
  t.same(splitStrings(Buffer.from('a\0b\0')), ['a', 'b'], 'empty tail dropped');
  t.same(splitStrings(Buffer.alloc(0)), []);
  t.same(splitStrings(Buffer.from('OK\0')), ['OK']);
  t.equal(parseErrno(Buffer.from('ENOENT\0')), 'ENOENT');
  t.equal(parseErrno(Buffer.from('EWHATEVER\0')), 'EINVAL', 'unknown error names read as EINVAL, like libxenstore');
});

t.test('E2BIG for payloads over the limit, exact limit accepted', async (t) => {
  const ok = encodeFrame({ type: XsOp.WRITE, reqId: 1, txId: 0, payload: Buffer.alloc(XENSTORE_PAYLOAD_MAX) });
  t.equal(ok.length, HEADER_SIZE + XENSTORE_PAYLOAD_MAX);
  let err: unknown;
  try {
    encodeFrame({ type: XsOp.WRITE, reqId: 1, txId: 0, payload: Buffer.alloc(XENSTORE_PAYLOAD_MAX + 1) }, '/p');
  } catch (e) {
    err = e;
  }
  t.ok(err instanceof XsError, 'an XsError');
  t.match(err, { errno: 'E2BIG', path: '/p', message: /4097 bytes/ });
});

t.test('decoder: byte-by-byte, several frames in one chunk, split across chunks', async (t) => {
  const f1 = encodeFrame({ type: XsOp.READ, reqId: 1, txId: 0, payload: Buffer.from('value') });
  const f2 = encodeFrame({ type: XsOp.WATCH_EVENT, reqId: 0, txId: 0, payload: nulStrings('/w', 't') });
  const f3 = encodeFrame({ type: XsOp.DIRECTORY, reqId: 3, txId: 9, payload: Buffer.alloc(0) });
  const all = Buffer.concat([f1, f2, f3]);

  const d1 = new FrameDecoder();
  const got1 = [];
  for (const byte of all) got1.push(...d1.push(Buffer.from([byte])));
  t.equal(got1.length, 3);
  t.equal(d1.pending, 0);

  const d2 = new FrameDecoder();
  const got2 = d2.push(all);
  t.same(
    got2.map((f) => [f.type, f.reqId, f.txId, f.payload.toString()]),
    [
      [XsOp.READ, 1, 0, 'value'],
      [XsOp.WATCH_EVENT, 0, 0, '/w\0t\0'],
      [XsOp.DIRECTORY, 3, 9, ''],
    ],
  );
  t.same(got1, got2);

  const d3 = new FrameDecoder();
  t.same(d3.push(all.subarray(0, 10)), [], 'half a header');
  t.same(d3.push(all.subarray(10, f1.length + 3)).length, 1, 'first frame complete');
  t.equal(d3.pending, 3);
  t.same(d3.push(all.subarray(f1.length + 3)).length, 2);
});

t.test('decoder refuses a header announcing more than the limit', async (t) => {
  const hdr = Buffer.alloc(HEADER_SIZE);
  hdr.writeUInt32LE(XsOp.WRITE, 0);
  hdr.writeUInt32LE(XENSTORE_PAYLOAD_MAX + 1, 12);
  t.throws(() => new FrameDecoder().push(hdr), FrameTooLargeError);
  hdr.writeUInt32LE(XENSTORE_PAYLOAD_MAX, 12);
  t.same(new FrameDecoder().push(hdr), [], 'exactly the limit waits for the payload');
});
