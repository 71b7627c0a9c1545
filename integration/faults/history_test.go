package faults

import (
	"encoding/json"
	"os"
	"sync"
	"time"
)

// Op is one operation of a workload: invoked at Invoke, completed at
// Complete (both since the start of the history) with Type "ok" (done and
// acknowledged as the API promises), "fail" (certainly not done) or "info"
// (indeterminate: it may have happened, or may still happen). Type is
// "invoke" while it runs.
type Op struct {
	ID       int           `json:"id"`
	Worker   string        `json:"worker"`
	F        string        `json:"f"`
	Node     string        `json:"node"`
	Key      string        `json:"key,omitempty"`
	Value    string        `json:"value,omitempty"`
	Type     string        `json:"type"`
	Err      string        `json:"error,omitempty"`
	Got      string        `json:"got,omitempty"` // what a read returned
	Invoke   time.Duration `json:"invoke_ns"`
	Complete time.Duration `json:"complete_ns,omitempty"`
}

// history records operations and nemesis events, and writes each event as
// a JSON line to its file as it happens (so a crashed run leaves it too).
type history struct {
	start time.Time

	mu  sync.Mutex // guards the following
	ops []*Op
	f   *os.File
	enc *json.Encoder
}

func newHistory(path string) *history {
	h := &history{start: time.Now()}
	if f, err := os.Create(path); err == nil {
		h.f, h.enc = f, json.NewEncoder(f)
	}
	return h
}

func (h *history) since() time.Duration { return time.Since(h.start) }

// event is one line of history.jsonl.
type event struct {
	T    float64 `json:"t"` // seconds since the start
	Ev   string  `json:"ev"`
	Op   *Op     `json:"op,omitempty"`
	What string  `json:"what,omitempty"`
	Text string  `json:"text,omitempty"`
}

func (h *history) writeLocked(e event) {
	if h.enc != nil {
		h.enc.Encode(e)
	}
}

// invoke records the start of an operation and returns it.
func (h *history) invoke(worker, f, node, key, value string) *Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	op := &Op{ID: len(h.ops), Worker: worker, F: f, Node: node, Key: key, Value: value, Type: "invoke", Invoke: h.since()}
	h.ops = append(h.ops, op)
	c := *op
	h.writeLocked(event{T: op.Invoke.Seconds(), Ev: "invoke", Op: &c})
	return op
}

// complete records the end of op.
func (h *history) complete(op *Op, typ, err, got string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	op.Type, op.Err, op.Got, op.Complete = typ, err, got, h.since()
	c := *op
	h.writeLocked(event{T: op.Complete.Seconds(), Ev: typ, Op: &c})
}

// note records a nemesis or harness event.
func (h *history) note(what, text string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.writeLocked(event{T: h.since().Seconds(), Ev: "note", What: what, Text: text})
}

// snapshot returns copies of every operation; ops still running are
// returned as "info" (they may take effect at any time).
func (h *history) snapshot() []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]Op, len(h.ops))
	for i, op := range h.ops {
		out[i] = *op
		if out[i].Type == "invoke" {
			out[i].Type = "info"
		}
	}
	return out
}

func (h *history) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.f != nil {
		h.f.Close()
		h.f, h.enc = nil, nil
	}
}
