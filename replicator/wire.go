package replicator

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire format.
//
// Notation: u8/u32/u64 are big-endian unsigned integers; uvarint is
// encoding/binary's unsigned varint; str is a uvarint length followed by
// that many bytes.
//
// Every message, gossip or stream, is
//
//	u8 version | u8 message type | body
//
// The version is the wire version that defined the message's layout
// (protoVersion = 1 for every layout below). Version 0 is malformed.
// Versions, the negotiation of capabilities on streams and what a node
// tolerates from a later release (unknown types, appended fields) are in
// version.go. Records are
//
//	record = str bucket | str key | u64 version time | str version node |
//	         u8 flags (bit 0: deleted; other bits zero) | str value
//
// Message bodies:
//
//	msgHello     1  32-byte random nonce
//	msgRecords   2  uvarint n | n × record
//	                gossip payload (memberlist user broadcast) and
//	                anti-entropy record chunks
//	msgReplicate 3  uvarint n | n × record
//	                the listener stores them durably, then answers msgAck
//	msgAck       4  uvarint n (records held; fewer than sent: the others
//	                were refused for clock skew, see skew.go)
//	msgDigest    5  str sender name | uvarint nb |
//	                nb × (str bucket | u64 root hash | uvarint entries)
//	msgRanges    6  uvarint nb | nb × (str bucket | 256 × u64 range hash)
//	msgSummary   7  u8 more (1: further ranges differ; sync again) | uvarint nb |
//	                nb × (str bucket | uvarint nr | nr × (u8 range | uvarint ne |
//	                ne × (str key | u64 version time | str version node | u8 flags)))
//	msgWant      8  uvarint nb | nb × (str bucket | uvarint nk | nk × str key)
//	msgEnd       9  empty
//	msgLeave    10  str node name (the dialer leaves the circle; answered by msgAck)
//	msgCaps     11  u8 min version | u8 max version | u64 capabilities |
//	                str node name | later fields (ignored); only after
//	                tagged hellos (version.go)
//	msgUnknown  12  u8 type: the reply to a request of an unknown type
//	msgSync     13  the tree exchange, see wiretree.go
//	msgTree     14  the tree exchange, see wiretree.go
//
// Gossip messages are memberlist user messages, encrypted and authenticated
// by memberlist with its keyring (SecretKey = HKDF-SHA256(secret, nil,
// "circle memberlist v1")).
//
// Streams use memberlist's transport (DialAddressTimeout / StreamCh). The
// dialer first writes the byte streamMagic (0xC7; memberlist's own streams
// start with a message type below 16 or with 244), then both sides send a
// plaintext msgHello with a fresh nonce (always exactly 34 bytes, version
// byte 1: the previous release reads exactly that; nodes that negotiate
// tag the nonce and then exchange msgCaps, see version.go). Every further
// message is a frame
//
//	u32 length | AES-256-GCM ciphertext (message above + 16-byte tag)
//
// with the nonce u64 frame counter (per direction, from 0) | 4 zero bytes,
// and the key HKDF-SHA256(streamKey, salt = dialer nonce | listener nonce,
// info "circle stream dialer" or "circle stream listener") for the
// dialer's and the listener's direction, where streamKey =
// HKDF-SHA256(secret, nil, "circle stream v1"). A peer without the secret
// fails at its first frame.
//
// Conversations on a stream (a stream may carry several in sequence):
//
//	replicate:    D: msgReplicate        L: msgAck
//	leave:        D: msgLeave            L: msgAck
//	anti-entropy: D: msgDigest           L: msgRanges (buckets whose roots differ;
//	                                        none: in sync, done)
//	              D: msgSummary (its keys in the differing ranges)
//	              L: msgRecords* (records where L's version wins), msgWant
//	                 (keys where D's version wins)
//	              D: msgRecords* (the wanted records), msgEnd
//	              L: msgEnd (after storing them durably)
const (
	protoVersion = 1
	streamMagic  = 0xC7

	msgHello     = 1
	msgRecords   = 2
	msgReplicate = 3
	msgAck       = 4
	msgDigest    = 5
	msgRanges    = 6
	msgSummary   = 7
	msgWant      = 8
	msgEnd       = 9
	msgLeave     = 10
	msgCaps      = 11
	msgUnknown   = 12

	numRanges = 256
	nonceLen  = 32

	flagDeleted = 1
)

// errMalformed is returned for undecodable input.
var errMalformed = errors.New("malformed message")

// errUnknownType wraps errMalformed for a message type this release does
// not know (a later release's; see version.go for what to do with it).
var errUnknownType = fmt.Errorf("%w: unknown message type", errMalformed)

// enc appends wire encodings to a byte slice.
type enc struct{ b []byte }

func newMsg(typ byte, sizeHint int) *enc {
	e := &enc{b: make([]byte, 0, 2+sizeHint)}
	e.b = append(e.b, protoVersion, typ)
	return e
}

func (e *enc) u8(v byte)      { e.b = append(e.b, v) }
func (e *enc) u64(v uint64)   { e.b = binary.BigEndian.AppendUint64(e.b, v) }
func (e *enc) uvar(v uint64)  { e.b = binary.AppendUvarint(e.b, v) }
func (e *enc) str(s string)   { e.uvar(uint64(len(s))); e.b = append(e.b, s...) }
func (e *enc) bytes(p []byte) { e.uvar(uint64(len(p))); e.b = append(e.b, p...) }

func (e *enc) record(r *Record) {
	e.str(r.Bucket)
	e.str(r.Key)
	e.u64(r.Version.Time)
	e.str(r.Version.Node)
	var f byte
	if r.Deleted {
		f |= flagDeleted
	}
	e.u8(f)
	e.bytes(r.Value)
}

// recordSize is an upper bound of the encoded size of r.
func recordSize(r *Record) int {
	return len(r.Bucket) + len(r.Key) + len(r.Version.Node) + len(r.Value) + 8 + 1 + 4*binary.MaxVarintLen64
}

// dec reads wire encodings; the first error sticks and later reads return
// zero values.
type dec struct {
	b   []byte
	err error
}

func (d *dec) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", errMalformed, what)
	}
	d.b = nil
}

func (d *dec) u8() byte {
	if len(d.b) < 1 {
		d.fail("short u8")
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *dec) u64() uint64 {
	if len(d.b) < 8 {
		d.fail("short u64")
		return 0
	}
	v := binary.BigEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *dec) uvar() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad uvarint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a uvarint element count; each element takes at least min
// bytes, so a count the remaining input cannot hold is malformed.
func (d *dec) count(min int) int {
	v := d.uvar()
	if d.err != nil {
		return 0
	}
	if v > uint64(len(d.b)/min) {
		d.fail("count exceeds input")
		return 0
	}
	return int(v)
}

func (d *dec) raw(max int) []byte {
	l := d.uvar()
	if d.err != nil {
		return nil
	}
	if l > uint64(max) {
		d.fail("field too long")
		return nil
	}
	if l > uint64(len(d.b)) {
		d.fail("short field")
		return nil
	}
	v := d.b[:l:l]
	d.b = d.b[l:]
	return v
}

func (d *dec) str(max int) string { return string(d.raw(max)) }

func (d *dec) flags() bool {
	f := d.u8()
	if f&^flagDeleted != 0 {
		d.fail("unknown flags")
	}
	return f&flagDeleted != 0
}

// record decodes and validates one record. The value is copied.
func (d *dec) record() Record {
	var r Record
	r.Bucket = d.str(MaxBucketLen)
	r.Key = d.str(MaxKeyLen)
	r.Version.Time = d.u64()
	r.Version.Node = d.str(maxNodeName)
	r.Deleted = d.flags()
	if v := d.raw(MaxValueLen); len(v) > 0 {
		r.Value = append([]byte(nil), v...)
	}
	if d.err == nil {
		if err := checkRecord(&r); err != nil {
			d.fail(err.Error())
		} else if r.Deleted && len(r.Value) > 0 {
			d.fail("tombstone with a value")
		}
	}
	return r
}

// end checks that the whole input was consumed.
func (d *dec) end() error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("trailing bytes")
	}
	return d.err
}

// parseHeader splits a message into its version, type and body. Any
// version from 1 up and any type pass.
func parseHeader(msg []byte) (ver, typ byte, body []byte, err error) {
	if len(msg) < 2 {
		return 0, 0, nil, fmt.Errorf("%w: short header", errMalformed)
	}
	if msg[0] == 0 {
		return 0, 0, nil, fmt.Errorf("%w: protocol version 0", errMalformed)
	}
	return msg[0], msg[1], msg[2:], nil
}

// header splits a message into its type and body; a type this release
// does not know is an error wrapping errUnknownType.
func header(msg []byte) (byte, []byte, error) {
	_, typ, body, err := parseHeader(msg)
	if err != nil {
		return 0, nil, err
	}
	if typ < msgHello || typ > msgTree {
		return 0, nil, fmt.Errorf("%w %d", errUnknownType, typ)
	}
	return typ, body, nil
}

// encodeRecords encodes a msgRecords or msgReplicate message.
func encodeRecords(typ byte, recs []Record) []byte {
	size := 0
	for i := range recs {
		size += recordSize(&recs[i])
	}
	e := newMsg(typ, size+binary.MaxVarintLen64)
	e.uvar(uint64(len(recs)))
	for i := range recs {
		e.record(&recs[i])
	}
	return e.b
}

// decodeRecords decodes the body of a msgRecords or msgReplicate message.
func decodeRecords(body []byte) ([]Record, error) {
	d := &dec{b: body}
	n := d.count(12)
	recs := make([]Record, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		recs = append(recs, d.record())
	}
	if err := d.end(); err != nil {
		return nil, err
	}
	return recs, nil
}

// decodeRecordsPrefix decodes the body of a msgRecords message of a later
// version than this release's: the records, then optional fields this
// release does not know, which it ignores.
func decodeRecordsPrefix(body []byte) ([]Record, error) {
	d := &dec{b: body}
	n := d.count(12)
	recs := make([]Record, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		recs = append(recs, d.record())
	}
	if d.err != nil {
		return nil, d.err
	}
	return recs, nil
}

// decodeMessage decodes any message, for fuzzing and diagnostics: it
// returns the type or an error, never panics.
func decodeMessage(msg []byte) (byte, error) {
	typ, body, err := header(msg)
	if err != nil {
		return 0, err
	}
	switch typ {
	case msgHello:
		if len(body) != nonceLen {
			return 0, fmt.Errorf("%w: hello length", errMalformed)
		}
	case msgRecords, msgReplicate:
		_, err = decodeRecords(body)
	case msgAck:
		d := &dec{b: body}
		d.uvar()
		err = d.end()
	case msgDigest:
		_, _, err = decodeDigest(body)
	case msgRanges:
		_, err = decodeRanges(body)
	case msgSummary:
		_, _, err = decodeSummary(body)
	case msgWant:
		_, err = decodeWant(body)
	case msgLeave:
		d := &dec{b: body}
		d.str(maxNodeName)
		err = d.end()
	case msgSync, msgTree:
		_, _, err = decodeTurnFrame(body, typ == msgSync, &treeTurn{})
	case msgEnd:
		if len(body) != 0 {
			err = fmt.Errorf("%w: end with a body", errMalformed)
		}
	case msgCaps:
		_, _, _, _, err = decodeCaps(body)
	case msgUnknown:
		d := &dec{b: body}
		d.u8()
		err = d.end()
	}
	return typ, err
}

// bucketDigest is one bucket's entry in msgDigest.
type bucketDigest struct {
	bucket  string
	root    uint64
	entries int
}

func encodeDigest(sender string, ds []bucketDigest) []byte {
	e := newMsg(msgDigest, 64*len(ds)+len(sender)+8)
	e.str(sender)
	e.uvar(uint64(len(ds)))
	for _, d := range ds {
		e.str(d.bucket)
		e.u64(d.root)
		e.uvar(uint64(d.entries))
	}
	return e.b
}

func decodeDigest(body []byte) (string, []bucketDigest, error) {
	d := &dec{b: body}
	sender := d.str(maxNodeName)
	n := d.count(10)
	out := make([]bucketDigest, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		out = append(out, bucketDigest{bucket: d.str(MaxBucketLen), root: d.u64(), entries: int(d.uvar() & (1<<62 - 1))})
	}
	return sender, out, d.end()
}

// bucketRanges is one bucket's entry in msgRanges.
type bucketRanges struct {
	bucket string
	hashes [numRanges]uint64
}

func encodeRanges(rs []bucketRanges) []byte {
	e := newMsg(msgRanges, len(rs)*(numRanges*8+MaxBucketLen+1))
	e.uvar(uint64(len(rs)))
	for i := range rs {
		e.str(rs[i].bucket)
		for _, h := range rs[i].hashes {
			e.u64(h)
		}
	}
	return e.b
}

func decodeRanges(body []byte) ([]bucketRanges, error) {
	d := &dec{b: body}
	n := d.count(numRanges*8 + 1)
	out := make([]bucketRanges, n)
	for i := 0; i < n && d.err == nil; i++ {
		out[i].bucket = d.str(MaxBucketLen)
		for j := range out[i].hashes {
			out[i].hashes[j] = d.u64()
		}
	}
	if err := d.end(); err != nil {
		return nil, err
	}
	return out, nil
}

// summaryEntry is one key's version in msgSummary.
type summaryEntry struct {
	key string
	m   meta
}

// rangeSummary lists one side's entries in one hash range.
type rangeSummary struct {
	r       byte
	entries []summaryEntry
}

// bucketSummary lists one bucket's differing ranges.
type bucketSummary struct {
	bucket string
	ranges []rangeSummary
}

func encodeSummary(more bool, bs []bucketSummary) []byte {
	size := 0
	for _, b := range bs {
		for _, r := range b.ranges {
			for _, e := range r.entries {
				size += len(e.key) + len(e.m.v.Node) + 12
			}
		}
	}
	e := newMsg(msgSummary, size+16)
	if more {
		e.u8(1)
	} else {
		e.u8(0)
	}
	e.uvar(uint64(len(bs)))
	for _, b := range bs {
		e.str(b.bucket)
		e.uvar(uint64(len(b.ranges)))
		for _, r := range b.ranges {
			e.u8(r.r)
			e.uvar(uint64(len(r.entries)))
			for _, x := range r.entries {
				e.str(x.key)
				e.u64(x.m.v.Time)
				e.str(x.m.v.Node)
				var f byte
				if x.m.deleted {
					f = flagDeleted
				}
				e.u8(f)
			}
		}
	}
	return e.b
}

func decodeSummary(body []byte) (bool, []bucketSummary, error) {
	d := &dec{b: body}
	more := d.u8()
	if more > 1 {
		d.fail("bad more flag")
	}
	nb := d.count(2)
	out := make([]bucketSummary, 0, nb)
	for i := 0; i < nb && d.err == nil; i++ {
		b := bucketSummary{bucket: d.str(MaxBucketLen)}
		nr := d.count(2)
		for j := 0; j < nr && d.err == nil; j++ {
			rs := rangeSummary{r: d.u8()}
			ne := d.count(12)
			rs.entries = make([]summaryEntry, 0, ne)
			for k := 0; k < ne && d.err == nil; k++ {
				var x summaryEntry
				x.key = d.str(MaxKeyLen)
				x.m.v.Time = d.u64()
				x.m.v.Node = d.str(maxNodeName)
				x.m.deleted = d.flags()
				rs.entries = append(rs.entries, x)
			}
			b.ranges = append(b.ranges, rs)
		}
		out = append(out, b)
	}
	if err := d.end(); err != nil {
		return false, nil, err
	}
	return more == 1, out, nil
}

// bucketKeys lists wanted keys of one bucket in msgWant.
type bucketKeys struct {
	bucket string
	keys   []string
}

func encodeWant(ws []bucketKeys) []byte {
	size := 0
	for _, w := range ws {
		for _, k := range w.keys {
			size += len(k) + 2
		}
	}
	e := newMsg(msgWant, size+8)
	e.uvar(uint64(len(ws)))
	for _, w := range ws {
		e.str(w.bucket)
		e.uvar(uint64(len(w.keys)))
		for _, k := range w.keys {
			e.str(k)
		}
	}
	return e.b
}

func decodeWant(body []byte) ([]bucketKeys, error) {
	d := &dec{b: body}
	nb := d.count(2)
	out := make([]bucketKeys, 0, nb)
	for i := 0; i < nb && d.err == nil; i++ {
		w := bucketKeys{bucket: d.str(MaxBucketLen)}
		nk := d.count(1)
		w.keys = make([]string, 0, nk)
		for j := 0; j < nk && d.err == nil; j++ {
			w.keys = append(w.keys, d.str(MaxKeyLen))
		}
		out = append(out, w)
	}
	if err := d.end(); err != nil {
		return nil, err
	}
	return out, nil
}

// encodeStored encodes a record's stored form (the bbolt value under its
// key):
//
//	u8 storage version (1) | u64 version time | str version node | u8 flags | value (rest)
func encodeStored(r *Record) []byte {
	e := &enc{b: make([]byte, 0, 12+len(r.Version.Node)+len(r.Value))}
	e.u8(1)
	e.u64(r.Version.Time)
	e.str(r.Version.Node)
	var f byte
	if r.Deleted {
		f = flagDeleted
	}
	e.u8(f)
	e.b = append(e.b, r.Value...)
	return e.b
}

// decodeStored decodes a stored value. The returned value aliases b (bbolt
// memory: copy before the transaction ends).
func decodeStored(b []byte) (meta, []byte, error) {
	d := &dec{b: b}
	if d.u8() != 1 {
		return meta{}, nil, fmt.Errorf("%w: unknown storage version", errMalformed)
	}
	var m meta
	m.v.Time = d.u64()
	m.v.Node = d.str(maxNodeName)
	m.deleted = d.flags()
	if d.err != nil {
		return meta{}, nil, d.err
	}
	return m, d.b, nil
}
