package replicator

import (
	"cmp"
	"fmt"
	"math"
	"time"
)

// Limits on record fields.
const (
	MaxBucketLen = 64      // bytes in a bucket name
	MaxKeyLen    = 1024    // bytes in a key
	MaxValueLen  = 4 << 20 // bytes in a value (4 MiB)
	maxNodeName  = 255     // bytes in a node name
)

// Version orders the writes of a key. Time is a hybrid logical clock:
// milliseconds since the Unix epoch in the upper 48 bits and a logical
// counter in the lower 16. Ties (equal Time) are broken by Node, the name of
// the writing node.
type Version struct {
	Time uint64
	Node string
}

// Compare returns -1, 0 or +1 as v is lower than, equal to or higher than o.
func (v Version) Compare(o Version) int {
	if c := cmp.Compare(v.Time, o.Time); c != 0 {
		return c
	}
	return cmp.Compare(v.Node, o.Node)
}

// IsZero reports whether v is the zero Version.
func (v Version) IsZero() bool { return v.Time == 0 && v.Node == "" }

// WallTime returns the physical part of v as a time.
func (v Version) WallTime() time.Time { return time.UnixMilli(int64(v.Time >> 16)) }

// String formats v for logs.
func (v Version) String() string { return fmt.Sprintf("%d.%d@%s", v.Time>>16, v.Time&0xffff, v.Node) }

// Record is one versioned value. Deleted records (tombstones) have no value.
// Values returned by the Node must not be modified.
type Record struct {
	Bucket  string
	Key     string
	Value   []byte
	Version Version
	Deleted bool
}

// meta is the part of a record that decides merges.
type meta struct {
	v       Version
	deleted bool
}

func (r *Record) meta() meta { return meta{v: r.Version, deleted: r.Deleted} }

// beats reports whether a replaces b as the winning record of a key. In
// general the higher version wins; in a first-writer-wins bucket the lower
// version wins between two live records.
func beats(fww bool, a, b meta) bool {
	c := a.v.Compare(b.v)
	if c == 0 {
		return false
	}
	if fww && !a.deleted && !b.deleted {
		return c < 0
	}
	return c > 0
}

// checkBucket validates a bucket name.
func checkBucket(bucket string) error {
	switch {
	case bucket == "":
		return fmt.Errorf("%w: empty bucket name", ErrInvalid)
	case len(bucket) > MaxBucketLen:
		return fmt.Errorf("%w: bucket name is %d bytes, the limit is %d", ErrInvalid, len(bucket), MaxBucketLen)
	}
	return nil
}

// checkKey validates a bucket and a key.
func checkKey(bucket, key string) error {
	if err := checkBucket(bucket); err != nil {
		return err
	}
	switch {
	case key == "":
		return fmt.Errorf("%w: empty key in bucket %q", ErrInvalid, bucket)
	case len(key) > MaxKeyLen:
		return fmt.Errorf("%w: key in bucket %q is %d bytes, the limit is %d", ErrInvalid, bucket, len(key), MaxKeyLen)
	}
	return nil
}

// checkRecord validates a record's fields (also records from the wire).
func checkRecord(r *Record) error {
	if err := checkKey(r.Bucket, r.Key); err != nil {
		return err
	}
	if len(r.Value) > MaxValueLen {
		return fmt.Errorf("%w: value of %s/%s is %d bytes, the limit is %d", ErrInvalid, r.Bucket, r.Key, len(r.Value), MaxValueLen)
	}
	if r.Version.Node == "" || len(r.Version.Node) > maxNodeName {
		return fmt.Errorf("%w: bad version node name", ErrInvalid)
	}
	return nil
}

// hlc is a hybrid logical clock. Not safe for concurrent use (Node.mu
// guards it).
//
// It never runs more than maxAhead ahead of its wall clock because of
// remote timestamps (observe refuses those; see skew.go), and it never
// wraps: the millisecond part is capped at 2^48-1 and a clock at the
// largest timestamp stays there.
type hlc struct {
	last     uint64
	now      func() time.Time
	maxAhead time.Duration // 0: observe takes any timestamp (unit tests)
	known    func() bool   // now is the circle's time, not only this node's (Node.circleKnown); nil: no
}

// maxMillis is the largest millisecond count a timestamp can carry.
const maxMillis = 1<<48 - 1

// physical returns t as a timestamp with a zero counter (milliseconds
// clamped to [0, maxMillis]).
func physical(t time.Time) uint64 {
	return uint64(min(max(t.UnixMilli(), 0), maxMillis)) << 16
}

// next returns a timestamp higher than every one returned or observed,
// except at the largest timestamp, which it returns again, and except when
// the clock ran more than maxAhead ahead of its time source: then it comes
// back to it (see below).
func (c *hlc) next() uint64 {
	pt := physical(c.now())
	if c.maxAhead > 0 && c.known != nil && c.known() && c.last > physical(time.UnixMilli(int64(pt>>16)).Add(c.maxAhead))|0xffff {
		// Our timestamps ran ahead of the circle's time by more than the
		// maximum skew (this node's wall clock was fast, and now the circle's
		// median or the time it last knew says so): peers refuse such
		// versions, so come back to the circle's time. (A clock that only
		// stepped back on a node that never measured the circle's keeps
		// counting on from its timestamps instead.) Keys written while
		// ahead keep their versions; a write to one of them fails with
		// ErrClockSkew until the clock reaches it (versionLocalLocked).
		c.last = pt
		return c.last
	}
	if pt > c.last {
		c.last = pt
	} else if c.last < math.MaxUint64 {
		c.last++
	}
	return c.last
}

// ceiling is the highest timestamp observe accepts now: the end of the
// millisecond maxAhead from the wall clock.
func (c *hlc) ceiling() uint64 {
	if c.maxAhead <= 0 {
		return math.MaxUint64
	}
	return physical(c.now().Add(c.maxAhead)) | 0xffff
}

// observe advances the clock past a remote timestamp; it reports whether
// the clock moved. A timestamp above the ceiling does not move it.
func (c *hlc) observe(t uint64) bool {
	if t > c.last && t <= c.ceiling() {
		c.last = t
		return true
	}
	return false
}
