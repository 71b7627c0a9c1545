package replicator

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// On-disk layout (bbolt, DataDir/circle.db):
//
//	meta            "hlc"    -> u64 last HLC timestamp issued or observed
//	                "name"   -> the node name that last opened the file
//	                "format" -> u32 data format (DataFormat); absent: format 1,
//	                            written by a release before format versions
//	                            (b4e49ea)
//	                "peers"  -> JSON {"node name": "host:port"}: the last known
//	                            address of every other node ever seen (heal.go);
//	                            absent in files of older builds
//	data / <bucket> <key>  -> encodeStored(record)
var (
	bktMeta   = []byte("meta")
	bktData   = []byte("data")
	keyHLC    = []byte("hlc")
	keyName   = []byte("name")
	keyFormat = []byte("format")
	keyPeers  = []byte("peers")
)

// DataFormat is the on-disk format this build writes and the highest it
// reads. A change to the layout above bumps it and adds the step from the
// previous format to migrations. The releases before format versions
// (b4e49ea) ignore "format" but refuse records whose storage version byte
// (encodeStored) is not 1, so a new format that they must not read changes
// that byte (or otherwise fails their loadState) rather than relying on the
// meta key.
const DataFormat = 1

// migrations[f] turns a database of format f into format f+1, inside the
// transaction that then stamps the new format. Format 1 without the key
// (b4e49ea's) needs no change beyond the stamp.
var migrations = map[uint32]func(tx *bolt.Tx) error{}

// DataFormatError: the data directory Dir holds a format this build does
// not read (errors.Is(err, ErrDataFormat)).
type DataFormatError struct {
	Dir    string
	Format uint32 // the format found
}

func (e *DataFormatError) Error() string {
	return fmt.Sprintf("data in %s was written by a newer Circle (format %d); this build reads format <= %d", e.Dir, e.Format, DataFormat)
}

func (e *DataFormatError) Is(target error) bool { return target == ErrDataFormat }

// checkFormat refuses a database written by a newer build and migrates an
// older one to DataFormat, stamping it (inside tx: all or nothing).
func checkFormat(tx *bolt.Tx, dir string) error {
	m := tx.Bucket(bktMeta)
	f := uint32(1)
	if v := m.Get(keyFormat); v != nil {
		if len(v) != 4 || binary.BigEndian.Uint32(v) == 0 {
			return fmt.Errorf("data in %s has a malformed format version %x: %w", dir, v, ErrDataFormat)
		}
		f = binary.BigEndian.Uint32(v)
	}
	if f > DataFormat {
		return &DataFormatError{Dir: dir, Format: f}
	}
	for ; f < DataFormat; f++ {
		if step := migrations[f]; step != nil {
			if err := step(tx); err != nil {
				return fmt.Errorf("migrating data in %s from format %d to %d: %w", dir, f, f+1, err)
			}
		}
	}
	if v := m.Get(keyFormat); v != nil && binary.BigEndian.Uint32(v) == DataFormat {
		return nil
	}
	return m.Put(keyFormat, binary.BigEndian.AppendUint32(nil, DataFormat))
}

// DBFile is the name of the bbolt file in Config.DataDir.
const DBFile = "circle.db"

// openDB opens (creating if needed) the bbolt file. bbolt fsyncs every
// committed transaction.
func openDB(dir string) (*bolt.DB, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	db, err := bolt.Open(filepath.Join(dir, DBFile), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", filepath.Join(dir, DBFile), err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bktMeta); err != nil {
			return err
		}
		if _, err := tx.CreateBucketIfNotExists(bktData); err != nil {
			return err
		}
		return checkFormat(tx, dir)
	})
	if errors.Is(err, ErrDataFormat) {
		db.Close()
		return nil, err
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising %s: %w", DBFile, err)
	}
	return db, nil
}

// loadState rebuilds the index from the database and returns the highest
// HLC timestamp found (stored clock or any record version) and the stored
// node name.
func loadState(db *bolt.DB) (index, uint64, string, error) {
	ix := index{}
	var clock uint64
	var name string
	err := db.View(func(tx *bolt.Tx) error {
		m := tx.Bucket(bktMeta)
		if v := m.Get(keyHLC); len(v) == 8 {
			clock = binary.BigEndian.Uint64(v)
		}
		name = string(m.Get(keyName))
		return tx.Bucket(bktData).ForEachBucket(func(bname []byte) error {
			bucket := string(bname)
			return tx.Bucket(bktData).Bucket(bname).ForEach(func(k, v []byte) error {
				md, _, err := decodeStored(v)
				if err != nil {
					return fmt.Errorf("record %s/%s: %w", bucket, k, err)
				}
				ix.set(bucket, string(k), md)
				clock = max(clock, md.v.Time)
				return nil
			})
		})
	})
	if err != nil {
		return nil, 0, "", fmt.Errorf("loading %s: %w", DBFile, err)
	}
	return ix, clock, name, nil
}

// putRecords writes records and the clock in one transaction (fsynced on
// commit).
func putRecords(tx *bolt.Tx, recs []Record, clock uint64) error {
	data := tx.Bucket(bktData)
	for i := range recs {
		r := &recs[i]
		b, err := data.CreateBucketIfNotExists([]byte(r.Bucket))
		if err != nil {
			return err
		}
		if err := b.Put([]byte(r.Key), encodeStored(r)); err != nil {
			return err
		}
	}
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], clock)
	return tx.Bucket(bktMeta).Put(keyHLC, buf[:])
}

// getRecord reads one record (tombstones included); ok is false if absent.
func getRecord(tx *bolt.Tx, bucket, key string) (Record, bool, error) {
	b := tx.Bucket(bktData).Bucket([]byte(bucket))
	if b == nil {
		return Record{}, false, nil
	}
	v := b.Get([]byte(key))
	if v == nil {
		return Record{}, false, nil
	}
	m, val, err := decodeStored(v)
	if err != nil {
		return Record{}, false, fmt.Errorf("record %s/%s: %w", bucket, key, err)
	}
	r := Record{Bucket: bucket, Key: key, Version: m.v, Deleted: m.deleted}
	if len(val) > 0 {
		r.Value = bytes.Clone(val)
	}
	return r, true, nil
}

// listRecords returns the live records of bucket whose key has prefix.
func listRecords(tx *bolt.Tx, bucket, prefix string) ([]Record, error) {
	b := tx.Bucket(bktData).Bucket([]byte(bucket))
	if b == nil {
		return nil, nil
	}
	var out []Record
	c := b.Cursor()
	p := []byte(prefix)
	for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
		m, val, err := decodeStored(v)
		if err != nil {
			return nil, fmt.Errorf("record %s/%s: %w", bucket, k, err)
		}
		if m.deleted {
			continue
		}
		out = append(out, Record{Bucket: bucket, Key: string(k), Value: bytes.Clone(val), Version: m.v})
	}
	return out, nil
}
