package identity

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
)

// Store is the small key/value interface the Service works on. In a circle it
// is the replicated store (caddymodule adapts *replicator.Node); in tests and
// single-process use it is a MemStore.
//
// Keys live in named buckets. Implementations must be safe for concurrent
// use.
type Store interface {
	// Get returns the value of bucket/key, or an error wrapping ErrNotFound
	// when it is absent (or deleted). The caller may keep the slice but must
	// not modify it.
	Get(bucket, key string) ([]byte, error)
	// List returns the live entries of bucket whose keys start with prefix,
	// sorted by key.
	List(bucket, prefix string) ([]Entry, error)
	// Put writes bucket/key and returns once the write is acknowledged (by
	// the configured number of replicas). On error the write may still have
	// happened locally and keep replicating.
	Put(ctx context.Context, bucket, key string, value []byte) error
	// Delete removes bucket/key (a tombstone in a replicated store), with the
	// same acknowledgement rules as Put. Deleting an absent key is not an
	// error.
	Delete(ctx context.Context, bucket, key string) error
	// PutAsync writes bucket/key locally and replicates it best-effort,
	// without waiting for acknowledgements.
	PutAsync(bucket, key string, value []byte) error
	// Watch calls fn after every change to the winning record of a key in
	// bucket, local or remote, including deletions (deleted=true, value nil).
	// Calls are serial per store and are not made while the store holds its
	// locks, so fn may call back into the store; fn must not block for long
	// (hand slow work to another goroutine). cancel stops further calls and
	// may be called more than once.
	Watch(bucket string, fn func(key string, value []byte, deleted bool)) (cancel func())
}

// Entry is one key/value pair returned by Store.List.
type Entry struct {
	Key   string
	Value []byte
}

// firstWriterWins are the buckets in which a MemStore, like the replicated
// store, keeps the existing live value when a Put would replace it.
var firstWriterWins = map[string]bool{bucketUsernames: true}

// MemStore is an in-memory Store for tests and single-process use. Its watch
// callbacks are delivered in write order, by the writing goroutine, after the
// write (a Put or Delete made from inside a callback is delivered after that
// callback returns, by the same goroutine).
//
// A cancel func returned by Watch stops deliveries that have not started;
// one already being delivered by another goroutine may still complete.
//
// Like the replicated store, the "usernames" bucket is first-writer-wins: a
// Put over an existing live key is silently ignored (read the key back to
// learn who owns it). A Delete followed by a Put does replace it.
type MemStore struct {
	mu       sync.Mutex // guards the following
	data     map[string]map[string][]byte
	watchers map[string]map[int]func(key string, value []byte, deleted bool)
	nextID   int
	queue    []memEvent // events not yet delivered
	busy     bool       // a goroutine is delivering queue
}

type memEvent struct {
	bucket, key string
	value       []byte
	deleted     bool
}

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore {
	return &MemStore{
		data:     make(map[string]map[string][]byte),
		watchers: make(map[string]map[int]func(string, []byte, bool)),
	}
}

// Get implements Store.
func (m *MemStore) Get(bucket, key string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.data[bucket][key]
	if !ok {
		return nil, fmt.Errorf("%s/%s: %w", bucket, key, ErrNotFound)
	}
	return v, nil // values are never modified in place
}

// List implements Store.
func (m *MemStore) List(bucket, prefix string) ([]Entry, error) {
	m.mu.Lock()
	out := make([]Entry, 0, len(m.data[bucket]))
	for k, v := range m.data[bucket] {
		if strings.HasPrefix(k, prefix) {
			out = append(out, Entry{Key: k, Value: v})
		}
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}

// Put implements Store.
func (m *MemStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return m.PutAsync(bucket, key, value)
}

// PutAsync implements Store. In a MemStore it is the same as Put.
func (m *MemStore) PutAsync(bucket, key string, value []byte) error {
	if bucket == "" || key == "" {
		return fmt.Errorf("identity: memstore: empty bucket or key: %w", ErrInvalidInput)
	}
	v := append([]byte(nil), value...)
	m.mu.Lock()
	b := m.data[bucket]
	if b == nil {
		b = make(map[string][]byte)
		m.data[bucket] = b
	}
	if _, exists := b[key]; exists && firstWriterWins[bucket] {
		m.mu.Unlock()
		return nil
	}
	b[key] = v
	m.queue = append(m.queue, memEvent{bucket: bucket, key: key, value: v})
	m.deliverLocked()
	return nil
}

// Delete implements Store.
func (m *MemStore) Delete(ctx context.Context, bucket, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	if _, ok := m.data[bucket][key]; !ok {
		m.mu.Unlock()
		return nil
	}
	delete(m.data[bucket], key)
	m.queue = append(m.queue, memEvent{bucket: bucket, key: key, deleted: true})
	m.deliverLocked()
	return nil
}

// deliverLocked is called with m.mu held and releases it. It delivers queued
// events unless another goroutine is already doing so (that goroutine will
// deliver ours too, in order).
func (m *MemStore) deliverLocked() {
	if m.busy {
		m.mu.Unlock()
		return
	}
	m.busy = true
	for len(m.queue) > 0 {
		ev := m.queue[0]
		m.queue = m.queue[1:]
		fns := make([]func(string, []byte, bool), 0, len(m.watchers[ev.bucket]))
		ids := make([]int, 0, len(m.watchers[ev.bucket]))
		for id := range m.watchers[ev.bucket] {
			ids = append(ids, id)
		}
		sort.Ints(ids)
		for _, id := range ids {
			fns = append(fns, m.watchers[ev.bucket][id])
		}
		m.mu.Unlock()
		for _, fn := range fns {
			fn(ev.key, ev.value, ev.deleted)
		}
		m.mu.Lock()
	}
	m.queue = nil
	m.busy = false
	m.mu.Unlock()
}

// Watch implements Store.
func (m *MemStore) Watch(bucket string, fn func(key string, value []byte, deleted bool)) (cancel func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := m.nextID
	m.nextID++
	if m.watchers[bucket] == nil {
		m.watchers[bucket] = make(map[int]func(string, []byte, bool))
	}
	m.watchers[bucket][id] = fn
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.watchers[bucket], id)
	}
}

var _ Store = (*MemStore)(nil)
