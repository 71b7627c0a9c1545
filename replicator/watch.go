package replicator

import (
	"context"
	"log/slog"
	"sort"
	"sync"
)

// watcher delivers change events to Watch callbacks, serially, from one
// goroutine (run), never while a Node lock is held.
type watcher struct {
	log  *slog.Logger
	wake chan struct{} // capacity 1: queue is not empty

	mu     sync.Mutex // guards the following
	fns    map[string]map[uint64]func(Record)
	nextID uint64
	queue  []Record // events not yet delivered, in commit order
}

func newWatcher(log *slog.Logger) *watcher {
	w := &watcher{
		log:  log,
		wake: make(chan struct{}, 1),
		fns:  make(map[string]map[uint64]func(Record)),
	}
	return w
}

func (w *watcher) lock()   { w.mu.Lock() }
func (w *watcher) unlock() { w.mu.Unlock() }

// add registers fn for bucket and returns its idempotent cancel function.
func (w *watcher) add(bucket string, fn func(Record)) func() {
	w.lock()
	w.nextID++
	id := w.nextID
	if w.fns[bucket] == nil {
		w.fns[bucket] = make(map[uint64]func(Record))
	}
	w.fns[bucket][id] = fn
	w.unlock()
	return func() {
		w.lock()
		delete(w.fns[bucket], id)
		if len(w.fns[bucket]) == 0 {
			delete(w.fns, bucket)
		}
		w.unlock()
	}
}

// enqueue queues the events of records that someone watches. It never
// blocks on callbacks, so the Node may call it with its write lock held
// (which keeps events in commit order).
func (w *watcher) enqueue(recs []Record) {
	if len(recs) == 0 {
		return
	}
	w.lock()
	added := false
	for _, r := range recs {
		if len(w.fns[r.Bucket]) > 0 {
			w.queue = append(w.queue, r)
			added = true
		}
	}
	w.unlock()
	if added {
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
}

// callbacks returns the callbacks of bucket in registration order.
func (w *watcher) callbacks(bucket string) []uint64 {
	w.lock()
	defer w.unlock()
	ids := make([]uint64, 0, len(w.fns[bucket]))
	for id := range w.fns[bucket] {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// lookup returns the callback id of bucket if it is still registered.
func (w *watcher) lookup(bucket string, id uint64) func(Record) {
	w.lock()
	defer w.unlock()
	return w.fns[bucket][id]
}

// run delivers events until ctx is done.
func (w *watcher) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
		}
		for {
			w.lock()
			batch := w.queue
			w.queue = nil
			w.unlock()
			if len(batch) == 0 {
				break
			}
			for _, ev := range batch {
				if ctx.Err() != nil {
					return
				}
				for _, id := range w.callbacks(ev.Bucket) {
					if fn := w.lookup(ev.Bucket, id); fn != nil {
						w.call(fn, ev)
					}
				}
			}
		}
	}
}

func (w *watcher) call(fn func(Record), ev Record) {
	defer func() {
		if p := recover(); p != nil {
			w.log.Error("watch callback panicked", "bucket", ev.Bucket, "key", ev.Key, "panic", p)
		}
	}()
	fn(ev)
}
