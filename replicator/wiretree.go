package replicator

// The tree exchange (anti-entropy proportional to the difference).
//
//	msgSync   11  str sender name | turn
//	msgTree   12  turn
//
//	turn  = u8 flags (bit 0: another msgTree of the same turn follows;
//	        other bits zero) | u64 sender's last sync (ms since the Unix
//	        epoch; 0: never) |
//	        uvarint nw | nw × (str bucket | uvarint nk | nk × str key)   wants
//	        uvarint ni | ni × item
//	item  = str bucket | u8 depth (0..16) | u64 prefix (< 16^depth) | u8 kind | body
//	  kind 0 root      (depth 0)   u64 hash | uvarint count
//	  kind 1 children  (depth<16)  16 × (u64 hash | uvarint count)
//	  kind 2 entries               uvarint ne | ne × (str key | u64 version time |
//	                               str version node | u8 flags)
//
// A tree node (depth d, prefix p) of a bucket covers the keys whose
// position (the first 8 bytes of SHA-256(key), big-endian) has p as its top
// 4·d bits; its hash is the XOR of entryHash(key, version) over them and
// its count their number (index.go). Items always describe the SENDER's
// tree. The conversation (turns alternate, the dialer first):
//
//	D: msgSync: a root item per bucket it has
//	then each side in turn, answering the other's last turn:
//	   msgRecords* (the records the other wanted, and those it lacks or holds
//	   an older version of, found by comparing entries items), then msgTree:
//	   wants (keys of entries items where the other's version wins), and for
//	   every node of the other's items whose hash or count differs from its
//	   own: entries (its keys there: few of them, or none) or children (its
//	   16 child hashes, to descend).
//	An empty turn (no wants, no items) ends the conversation; its sender
//	has nothing more to receive either.
//
// A node from a release without these types closes the stream on msgSync;
// the dialer then falls back to msgDigest (wire.go) on a new stream.

import "fmt"

const (
	msgSync = 13
	msgTree = 14

	itemRoot     = 0
	itemChildren = 1
	itemEntries  = 2

	turnMore = 1 // flags bit 0
)

// treeItem is one item of a turn.
type treeItem struct {
	bucket  string
	depth   int
	prefix  uint64
	kind    byte
	node    tnode             // itemRoot
	kids    [treeFanout]tnode // itemChildren
	entries []summaryEntry    // itemEntries
}

// treeTurn is a decoded turn (all its frames).
type treeTurn struct {
	lastSync uint64 // the sender's last sync, ms
	wants    []bucketKeys
	items    []treeItem
}

func (t *treeTurn) empty() bool { return len(t.wants) == 0 && len(t.items) == 0 }

// itemSize is an upper bound of an item's encoded size.
func itemSize(it *treeItem) int {
	s := len(it.bucket) + 32
	switch it.kind {
	case itemChildren:
		s += treeFanout * 18
	case itemEntries:
		for _, e := range it.entries {
			s += len(e.key) + len(e.m.v.Node) + 24
		}
	}
	return s
}

// encodeTurn encodes a turn as frames of about chunkBytes at most (one
// large item or want list may exceed it); the first is msgSync if sender
// is set, the others msgTree. keys counts the keys listed.
func encodeTurn(sender string, lastSync uint64, wants []bucketKeys, items []treeItem) (frames [][]byte, keys int) {
	var e *enc
	var w, it enc
	wc, ic := 0, 0
	flush := func(more bool) {
		typ := byte(msgTree)
		if sender != "" && len(frames) == 0 {
			typ = msgSync
		}
		e = newMsg(typ, len(w.b)+len(it.b)+32)
		if typ == msgSync {
			e.str(sender)
		}
		if more {
			e.u8(turnMore)
		} else {
			e.u8(0)
		}
		e.u64(lastSync)
		e.uvar(uint64(wc))
		e.b = append(e.b, w.b...)
		e.uvar(uint64(ic))
		e.b = append(e.b, it.b...)
		frames = append(frames, e.b)
		w.b, it.b, wc, ic = nil, nil, 0, 0
	}
	for _, bk := range wants {
		for start := 0; start < len(bk.keys); {
			end, size := start, 0
			for end < len(bk.keys) && (end == start || size < chunkBytes/2) {
				size += len(bk.keys[end]) + 2
				end++
			}
			w.str(bk.bucket)
			w.uvar(uint64(end - start))
			for _, k := range bk.keys[start:end] {
				w.str(k)
			}
			keys += end - start
			wc++
			start = end
			if len(w.b)+len(it.b) >= chunkBytes {
				flush(true)
			}
		}
	}
	for i := range items {
		x := &items[i]
		it.str(x.bucket)
		it.u8(byte(x.depth))
		it.u64(x.prefix)
		it.u8(x.kind)
		switch x.kind {
		case itemRoot:
			it.u64(x.node.hash)
			it.uvar(uint64(x.node.count))
		case itemChildren:
			for _, c := range x.kids {
				it.u64(c.hash)
				it.uvar(uint64(c.count))
			}
		case itemEntries:
			it.uvar(uint64(len(x.entries)))
			for _, en := range x.entries {
				it.str(en.key)
				it.u64(en.m.v.Time)
				it.str(en.m.v.Node)
				var f byte
				if en.m.deleted {
					f = flagDeleted
				}
				it.u8(f)
			}
			keys += len(x.entries)
		}
		ic++
		if len(w.b)+len(it.b) >= chunkBytes && i < len(items)-1 {
			flush(true)
		}
	}
	flush(false)
	return frames, keys
}

// decodeTurnFrame decodes one msgSync (withSender) or msgTree body and
// appends it to t; more reports whether another frame of the turn follows.
func decodeTurnFrame(body []byte, withSender bool, t *treeTurn) (sender string, more bool, err error) {
	d := &dec{b: body}
	if withSender {
		sender = d.str(maxNodeName)
	}
	f := d.u8()
	if f&^turnMore != 0 {
		d.fail("unknown turn flags")
	}
	t.lastSync = d.u64()
	nw := d.count(2)
	for i := 0; i < nw && d.err == nil; i++ {
		w := bucketKeys{bucket: d.str(MaxBucketLen)}
		nk := d.count(1)
		w.keys = make([]string, 0, nk)
		for j := 0; j < nk && d.err == nil; j++ {
			w.keys = append(w.keys, d.str(MaxKeyLen))
		}
		if d.err == nil {
			if err := checkBucket(w.bucket); err != nil {
				d.fail(err.Error())
			}
		}
		t.wants = append(t.wants, w)
	}
	ni := d.count(12)
	for i := 0; i < ni && d.err == nil; i++ {
		x := treeItem{bucket: d.str(MaxBucketLen), depth: int(d.u8()), prefix: d.u64(), kind: d.u8()}
		switch {
		case d.err != nil:
		case checkBucket(x.bucket) != nil:
			d.fail("bad bucket in item")
		case x.depth > maxTreeDepth:
			d.fail("item too deep")
		case x.depth < maxTreeDepth && x.prefix>>(treeBits*x.depth) != 0:
			d.fail("item prefix beyond its depth")
		}
		switch x.kind {
		case itemRoot:
			if x.depth != 0 {
				d.fail("root item below depth 0")
			}
			x.node = tnode{hash: d.u64(), count: int(d.uvar() & (1<<62 - 1))}
		case itemChildren:
			if x.depth >= maxTreeDepth {
				d.fail("children below the deepest level")
			}
			for c := range x.kids {
				x.kids[c] = tnode{hash: d.u64(), count: int(d.uvar() & (1<<62 - 1))}
			}
		case itemEntries:
			ne := d.count(12)
			x.entries = make([]summaryEntry, 0, ne)
			for k := 0; k < ne && d.err == nil; k++ {
				var en summaryEntry
				en.key = d.str(MaxKeyLen)
				en.m.v.Time = d.u64()
				en.m.v.Node = d.str(maxNodeName)
				en.m.deleted = d.flags()
				x.entries = append(x.entries, en)
			}
		default:
			d.fail(fmt.Sprintf("unknown item kind %d", x.kind))
		}
		t.items = append(t.items, x)
	}
	if err := d.end(); err != nil {
		return "", false, err
	}
	return sender, f&turnMore != 0, nil
}
