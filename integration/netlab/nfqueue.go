package netlab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// delayQueue is a minimal NFQUEUE client (netlink, no cgo, no library): it
// binds a queue in the namespace it was created in, asks for packet metadata
// only, and accepts every packet d after it was queued. Packets keep their
// order (constant delay, FIFO). If more than maxQueued packets wait, new ones
// are accepted at once rather than dropped (fail-open), so Delay never adds
// loss; each packet costs one netlink message each way, which is plenty for
// tests but not for line-rate benchmarks.
type delayQueue struct {
	fd    int
	queue uint16
	delay atomic.Int64
	ch    chan queued
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
	seq   atomic.Uint32
}

type queued struct {
	id uint32
	at time.Time
}

const (
	nfnlSubsysQueue     = 3
	nfqnlMsgPacket      = 0
	nfqnlMsgVerdict     = 1
	nfqnlMsgConfig      = 2
	nfqaCfgCmd          = 1
	nfqaCfgParams       = 2
	nfqaCfgQueueMaxlen  = 3
	nfqaCfgMask         = 4
	nfqaCfgFlags        = 5
	nfqaCfgFFailOpen    = 1
	nfqaPacketHdr       = 1
	nfqaVerdictHdr      = 2
	nfqnlCfgCmdBind     = 1
	nfqnlCopyMeta       = 1
	nfAccept            = 1
	maxQueued           = 8192
	netlinkNoENOBUFS    = 5
	nlmsgHdrLen         = 16
	nfgenMsgLen         = 4
	recvTimeout         = 100 * time.Millisecond
	defaultSocketBuffer = 1 << 20
)

func newDelayQueue(num uint16) (*delayQueue, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, err
	}
	q := &delayQueue{fd: fd, queue: num, ch: make(chan queued, maxQueued), done: make(chan struct{})}
	fail := func(err error) (*delayQueue, error) {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fail(err)
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, defaultSocketBuffer) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, defaultSocketBuffer)
	}
	unix.SetsockoptInt(fd, unix.SOL_NETLINK, netlinkNoENOBUFS, 1)
	tv := unix.NsecToTimeval(recvTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fail(err)
	}
	// Bind the queue.
	cmd := []byte{nfqnlCfgCmdBind, 0, 0, 0} // command, pad, pf (be16, unused)
	if err := q.request(nfqnlMsgConfig, attr(nfqaCfgCmd, cmd)); err != nil {
		return fail(fmt.Errorf("bind queue: %w", err))
	}
	// Metadata only: copy_range (be32) 0, copy_mode META.
	params := []byte{0, 0, 0, 0, nfqnlCopyMeta}
	maxlen := binary.BigEndian.AppendUint32(nil, maxQueued)
	if err := q.request(nfqnlMsgConfig, append(attr(nfqaCfgParams, params), attr(nfqaCfgQueueMaxlen, maxlen)...)); err != nil {
		return fail(fmt.Errorf("queue params: %w", err))
	}
	// A full queue lets packets through instead of dropping them.
	flag := binary.BigEndian.AppendUint32(nil, nfqaCfgFFailOpen)
	if err := q.request(nfqnlMsgConfig, append(attr(nfqaCfgFlags, flag), attr(nfqaCfgMask, flag)...)); err != nil {
		return fail(fmt.Errorf("queue flags: %w", err))
	}
	return q, nil
}

func attr(typ uint16, data []byte) []byte {
	l := 4 + len(data)
	b := make([]byte, (l+3)&^3)
	binary.NativeEndian.PutUint16(b[0:], uint16(l))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], data)
	return b
}

func (q *delayQueue) message(msg uint16, flags uint16, payload []byte) ([]byte, uint32) {
	seq := q.seq.Add(1)
	b := make([]byte, nlmsgHdrLen+nfgenMsgLen, nlmsgHdrLen+nfgenMsgLen+len(payload))
	binary.NativeEndian.PutUint32(b[0:], uint32(nlmsgHdrLen+nfgenMsgLen+len(payload)))
	binary.NativeEndian.PutUint16(b[4:], nfnlSubsysQueue<<8|msg)
	binary.NativeEndian.PutUint16(b[6:], unix.NLM_F_REQUEST|flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	b[16] = unix.AF_UNSPEC
	b[17] = 0 // NFNETLINK_V0
	binary.BigEndian.PutUint16(b[18:], q.queue)
	return append(b, payload...), seq
}

// request sends a message with NLM_F_ACK and waits (bounded) for the ack.
func (q *delayQueue) request(msg uint16, payload []byte) error {
	b, seq := q.message(msg, unix.NLM_F_ACK, payload)
	if err := unix.Sendto(q.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for range 20 {
		n, _, err := unix.Recvfrom(q.fd, buf, 0)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Seq != seq || m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
				continue
			}
			if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
				return unix.Errno(-e)
			}
			return nil
		}
	}
	return errors.New("no netlink ack")
}

func (q *delayQueue) setDelay(d time.Duration) { q.delay.Store(int64(d)) }

func (q *delayQueue) verdict(id uint32) {
	hdr := make([]byte, 8)
	binary.BigEndian.PutUint32(hdr[0:], nfAccept)
	binary.BigEndian.PutUint32(hdr[4:], id)
	b, _ := q.message(nfqnlMsgVerdict, 0, attr(nfqaVerdictHdr, hdr))
	unix.Sendto(q.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
}

// start reads queued packets until stop; a second goroutine releases them.
func (q *delayQueue) start() {
	q.wg.Add(2)
	go q.loop()
	go q.release()
}

func (q *delayQueue) loop() {
	defer q.wg.Done()
	buf := make([]byte, 1<<16)
	for {
		select {
		case <-q.done:
			return
		default:
		}
		n, _, err := unix.Recvfrom(q.fd, buf, 0)
		if err != nil {
			continue // timeout (bounded by SO_RCVTIMEO) or ENOBUFS
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			continue
		}
		now := time.Now()
		for _, m := range msgs {
			if m.Header.Type != nfnlSubsysQueue<<8|nfqnlMsgPacket || len(m.Data) < nfgenMsgLen {
				continue
			}
			id, ok := packetID(m.Data[nfgenMsgLen:])
			if !ok {
				continue
			}
			select {
			case q.ch <- queued{id, now}:
			default:
				q.verdict(id) // too many waiting: pass at once
			}
		}
	}
}

func packetID(attrs []byte) (uint32, bool) {
	for len(attrs) >= 4 {
		l := int(binary.NativeEndian.Uint16(attrs[0:]))
		typ := binary.NativeEndian.Uint16(attrs[2:]) & 0x3fff
		if l < 4 || l > len(attrs) {
			return 0, false
		}
		if typ == nfqaPacketHdr && l >= 8 {
			return binary.BigEndian.Uint32(attrs[4:]), true
		}
		attrs = attrs[min((l+3)&^3, len(attrs)):]
	}
	return 0, false
}

func (q *delayQueue) release() {
	defer q.wg.Done()
	for {
		select {
		case <-q.done:
			return
		case p := <-q.ch:
			if w := time.Until(p.at.Add(time.Duration(q.delay.Load()))); w > 0 {
				select {
				case <-time.After(w):
				case <-q.done:
					return
				}
			}
			q.verdict(p.id)
		}
	}
}

func (q *delayQueue) stop() {
	q.once.Do(func() {
		close(q.done)
		q.wg.Wait() // the reader returns within recvTimeout
		unix.Close(q.fd)
	})
}
