package main

import (
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"
)

// The control endpoint: HTTPS paths under /lab/ on the simulator's own server, for
// what a guest or an operator does outside the vSphere API (guest writes, reading
// disks as the guest sees them, faults, counters). Requests carry the token from
// STATE/lab.json as "Authorization: Bearer <token>".

type badInput struct{ error }

func (l *Lab) controlHandler(token string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "missing or wrong control token"})
			return
		}
		var req map[string]json.RawMessage
		if r.Method == http.MethodPost {
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "request body is not a JSON object"})
				return
			}
		}
		res, err := l.control(strings.TrimPrefix(r.URL.Path, "/lab/"), req)
		switch err.(type) {
		case nil:
			writeJSON(w, http.StatusOK, res)
		case badInput:
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		default:
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
		}
	}
}

func writeJSON(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func field(req map[string]json.RawMessage, name string, dst interface{}) error {
	raw, ok := req[name]
	if !ok {
		return nil
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return badInput{fmt.Errorf("field %s: %v", name, err)}
	}
	return nil
}

func (l *Lab) control(op string, req map[string]json.RawMessage) (interface{}, error) {
	var vm, disk, snapshot, output, host string
	var offset, length int64
	seed := uint64(1)
	for name, dst := range map[string]interface{}{"vm": &vm, "disk": &disk, "snapshot": &snapshot, "output": &output,
		"host": &host, "offset": &offset, "length": &length, "seed": &seed} {
		if err := field(req, name, dst); err != nil {
			return nil, err
		}
	}
	switch op {
	case "status":
		return l.status(), nil
	case "write":
		res, err := l.guestWrite(vm, disk, offset, length, seed)
		if err != nil {
			return nil, badInput{err}
		}
		return res, nil
	case "disk-image":
		res, err := l.diskImage(vm, disk, snapshot, output)
		if err != nil {
			return nil, badInput{err}
		}
		return res, nil
	case "fault":
		var f Faults
		if raw, ok := req["faults"]; ok {
			var err error
			if f, err = decodeFaults(raw); err != nil {
				return nil, badInput{err}
			}
		}
		return l.setFault(vm, host, f)
	case "drop-sessions":
		// idle_seconds: only sessions idle that long (vCenter's idle timeout);
		// after_folder_requests: drop every session after that many more /folder requests.
		var idle float64
		var after int
		if err := field(req, "idle_seconds", &idle); err != nil {
			return nil, err
		}
		if err := field(req, "after_folder_requests", &after); err != nil {
			return nil, err
		}
		if after > 0 {
			l.sessions.dropAfterFolderRequests(after)
			return map[string]int{"dropped": 0, "after_folder_requests": after}, nil
		}
		if _, ok := req["idle_seconds"]; ok {
			return map[string]int{"dropped": l.sessions.expireIdle(time.Duration(idle * float64(time.Second)))}, nil
		}
		return map[string]int{"dropped": l.sessions.drop()}, nil
	case "counters/reset":
		l.counters.reset()
		return l.counters, nil
	}
	return nil, badInput{fmt.Errorf("unknown control operation %q", op)}
}

func (l *Lab) setFault(vmName, host string, f Faults) (interface{}, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case vmName != "" && host == "":
		vm, err := l.findVM(vmName)
		if err != nil {
			return nil, badInput{err}
		}
		vm.faults = f
		vm.syncGuest()
	case host != "" && vmName == "":
		if _, ok := l.hostRefs[host]; !ok {
			return nil, badInput{fmt.Errorf("no host named %q in the lab", host)}
		}
		x := f
		l.hostFaults[host] = &x
	default:
		return nil, badInput{fmt.Errorf("a fault is set on exactly one VM or one host")}
	}
	return map[string]interface{}{"vm": vmName, "host": host, "faults": f}, nil
}

func (l *Lab) status() interface{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	type diskOut struct {
		Name     string   `json:"name"`
		Key      int32    `json:"key"`
		Capacity int64    `json:"capacity"`
		File     string   `json:"file"`
		Chain    []string `json:"chain"`
		ChangeID string   `json:"change_id,omitempty"`
		Mode     string   `json:"mode"`
		RDM      bool     `json:"rdm,omitempty"`
	}
	type snapOut struct {
		Name  string            `json:"name"`
		Moref string            `json:"moref"`
		Disks map[string]string `json:"disks"`
	}
	type vmOut struct {
		Name                string        `json:"name"`
		Key                 string        `json:"key"` // how the lab's commands name it: the name, or "<folder>/<name>"
		Moref               string        `json:"moref"`
		Host                string        `json:"host"`
		Power               string        `json:"power"`
		Agent               bool          `json:"agent"`
		ToolsRunning        bool          `json:"tools_running"`
		CBT                 bool          `json:"cbt"`
		Encrypted           bool          `json:"encrypted"`
		ConsolidationNeeded bool          `json:"consolidation_needed"`
		Disks               []diskOut     `json:"disks"`
		Snapshots           []snapOut     `json:"snapshots"`
		Attached            []*Attachment `json:"attached,omitempty"`
		Faults              Faults        `json:"faults"`
	}
	var vms []vmOut
	for _, vm := range l.vms {
		o := vmOut{Name: vm.Name, Key: vm.key, Moref: vm.Self.Value, Host: vm.hostName(), Power: string(vm.Runtime.PowerState),
			Agent: vm.agent, ToolsRunning: vm.toolsRunning(), Faults: vm.faults,
			CBT:                 vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled,
			Encrypted:           vm.Config.KeyId != nil,
			ConsolidationNeeded: vm.Runtime.ConsolidationNeeded != nil && *vm.Runtime.ConsolidationNeeded,
			Disks:               []diskOut{}, Snapshots: []snapOut{}}
		for _, d := range vm.disks {
			do := diskOut{Name: d.Name, Key: d.Key, Capacity: d.Capacity, File: d.Top.DSPath(), ChangeID: d.changeID(),
				Mode: d.diskMode(), RDM: d.RDM}
			for e := d.Top; e != nil; e = e.Parent {
				do.Chain = append(do.Chain, e.DSPath())
			}
			o.Disks = append(o.Disks, do)
		}
		for _, s := range vm.snaps {
			so := snapOut{Name: s.Tree.Name, Moref: s.Ref.Value, Disks: map[string]string{}}
			for _, d := range vm.disks {
				if sd := s.Disks[d.Key]; sd != nil {
					so.Disks[d.Name] = sd.Extent.DSPath()
				}
			}
			o.Snapshots = append(o.Snapshots, so)
		}
		for _, a := range vm.hot {
			o.Attached = append(o.Attached, a)
		}
		sort.Slice(o.Attached, func(i, j int) bool { return o.Attached[i].Key < o.Attached[j].Key })
		vms = append(vms, o)
	}
	sort.Slice(vms, func(i, j int) bool {
		return vms[i].Name < vms[j].Name || vms[i].Name == vms[j].Name && vms[i].Key < vms[j].Key
	})
	hostFaults := map[string]Faults{}
	for h, f := range l.hostFaults {
		hostFaults[h] = *f
	}
	return map[string]interface{}{
		"mode": l.topo.Mode, "datacenter": l.topo.Datacenter, "hosts": l.topo.hosts(),
		"datastores": l.dsDirs, "agents": l.agents, "vms": vms,
		"counters": l.counters, "host_faults": hostFaults,
	}
}
