package main

import "sync"

// Counter is how many of a thing exist now, and the most that ever existed at once.
type Counter struct {
	Now  int `json:"now"`
	Peak int `json:"peak"`
}

// Counters records, per host, datastore and agent, the snapshots and attached disks
// that existed at once, so that tests can prove that limits held.
type Counters struct {
	mu        sync.Mutex
	Snapshots map[string]map[string]*Counter `json:"snapshots"`      // "host"|"datastore" -> name
	Attached  map[string]map[string]*Counter `json:"attached_disks"` // "agent"|"host"|"datastore" -> name
}

func newCounters() *Counters {
	return &Counters{
		Snapshots: map[string]map[string]*Counter{"host": {}, "datastore": {}},
		Attached:  map[string]map[string]*Counter{"agent": {}, "host": {}, "datastore": {}},
	}
}

func bump(m map[string]*Counter, name string, delta int) {
	c := m[name]
	if c == nil {
		c = &Counter{}
		m[name] = c
	}
	c.Now += delta
	if c.Now > c.Peak {
		c.Peak = c.Now
	}
}

func (c *Counters) snapshotAdded(s *SnapState) { c.snapshot(s, 1) }

func (c *Counters) snapshotRemoved(s *SnapState) { c.snapshot(s, -1) }

func (c *Counters) snapshot(s *SnapState, delta int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	bump(c.Snapshots["host"], s.Host, delta)
	for _, ds := range s.DSNames {
		bump(c.Snapshots["datastore"], ds, delta)
	}
}

func (c *Counters) attach(agent, host, ds string, delta int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	bump(c.Attached["agent"], agent, delta)
	bump(c.Attached["host"], host, delta)
	bump(c.Attached["datastore"], ds, delta)
}

// reset sets every peak to the current value (tests start a measurement with it).
func (c *Counters) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, group := range []map[string]map[string]*Counter{c.Snapshots, c.Attached} {
		for _, m := range group {
			for _, x := range m {
				x.Peak = x.Now
			}
		}
	}
}
