package main

import (
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
)

// Counter is how many of a thing exist now, and the most that ever existed at once.
type Counter struct {
	Now  int `json:"now"`
	Peak int `json:"peak"`
}

// Counters records, per host, datastore and agent, the snapshots and attached disks
// that existed at once, so that tests can prove that limits held; and how many
// vSphere API requests the simulator has served, so that tests can prove a
// client's calls do not grow with the inventory.
type Counters struct {
	mu        sync.Mutex
	Snapshots map[string]map[string]*Counter `json:"snapshots"`      // "host"|"datastore" -> name
	Attached  map[string]map[string]*Counter `json:"attached_disks"` // "agent"|"host"|"datastore" -> name
	apiCalls  int64                          // atomic: SOAP requests to /sdk and HTTP requests to /folder
}

// MarshalJSON writes the counters under their lock (status answers while runs change them).
func (c *Counters) MarshalJSON() ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return json.Marshal(struct {
		Snapshots map[string]map[string]*Counter `json:"snapshots"`
		Attached  map[string]map[string]*Counter `json:"attached_disks"`
		APICalls  int64                          `json:"api_calls"`
	}{c.Snapshots, c.Attached, atomic.LoadInt64(&c.apiCalls)})
}

// isAPIRequest says whether a request is a vSphere API call: SOAP to the SDK
// endpoint, or datastore file access over /folder. The lab's control
// endpoint (/lab/) and anything else the server answers are not.
func isAPIRequest(r *http.Request) bool {
	p := r.URL.Path
	return p == "/sdk" || strings.HasPrefix(p, "/sdk/") || p == "/folder" || strings.HasPrefix(p, "/folder/")
}

// countRequests counts every vSphere API request the server is asked, whatever its
// answer (a refused session's call counts: the server did the work of refusing it).
func (c *Counters) countRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isAPIRequest(r) {
			atomic.AddInt64(&c.apiCalls, 1)
		}
		next.ServeHTTP(w, r)
	})
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

// reset sets every peak to the current value (tests start a measurement with it);
// api_calls keeps counting (tests take differences).
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
