using Akka.Actor;
using Akka.Event;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Memory;

/// <summary>
/// The vmspace actor: thin around <see cref="GuestPager"/> (paging, pmap, swap, holds),
/// <see cref="EptBarrier"/> (generation + acks) and an <see cref="IDirtyTracker"/>. Nested page faults arrive as messages from the
/// userfaultfd reader thread and are resolved in mailbox order with everything else, so a fault
/// never races an A/D clear or a swap-out of the same page inside the vmspace.
/// States: Paging (userfaultfd on) or Unpaged (off), and Failed once a paging error is reported
/// (Paging --uffd/swap error--> Failed: VmspaceFailed sent, userfaultfd unregistered and closed,
/// memory still readable and writable through the host view).
/// Dirty tracking (<see cref="VmspaceOptions.DirtyTracking"/>) is the tracker's: uffd-wp lives in
/// the pager's pmap; with dirty-log it reads and clears KVM's log; with dirty-ring the vcpus harvest
/// their rings on their own threads and send the GFNs here, with their EPT acks (every vcpu is
/// asked, whatever its state) and after a ring-full exit.
/// </summary>
internal sealed class VmspaceActor : ReceiveActor
{
    /// <summary>From the reader thread: it stopped on an error.</summary>
    internal sealed record ReaderFailed(string Reason);

    private sealed record HoldEntry(GpaHold Lease, IActorRef Owner, ulong FirstPage, ulong Pages);

    private readonly GuestMemoryMap _memory;
    private readonly VmspaceOptions _options;
    private readonly IActorRef _events;
    private readonly EptBarrier _barrier = new();
    private readonly ILoggingAdapter _log = Context.GetLogger();
    private readonly Dictionary<long, HoldEntry> _holds = [];
    private readonly HashSet<IActorRef> _watchedHolders = [];
    private GuestPager? _pager;
    private RestoreImage? _restore;
    private string? _restoreFailure;
    private string? _failure;
    private FaultProtocol.FailNestedPageFaults? _failFaults;
    private long _reads, _writes, _faults, _nextHoldId, _accessedScans, _scanPageOuts, _flushedPages;
    private readonly RamPages _ram;
    private readonly IDirtyTracker _dirty;
    private long _barrierHarvests, _ringFullHarvests, _harvestedGfns, _ringOverflows;

    private readonly RamWriteLog? _writeLog;

    public VmspaceActor(GuestMemoryMap memory, VmspaceOptions options, IActorRef events, IDirtyLog? dirtyLog, VmHandle? kvm = null)
    {
        _memory = memory;
        _options = options;
        _events = events;
        _ram = new RamPages(memory);
        _dirty = DirtyTrackers.Create(options.DirtyTracking, memory, dirtyLog);
        _writeLog = kvm is null ? null : new RamWriteLog(memory, _ram, kvm);

        Receive<ReadMemory>(OnRead);
        Receive<WriteMemory>(OnWrite);
        Receive<GetLayout>(_ => Sender.Tell(new Layout(
            _memory.Segments.Select(s => new Segment(s.Name, s.Base.Value, s.Size, s.ReadOnly)).ToArray())));
        Receive<AwaitReady>(_ => Sender.Tell(_restoreFailure is { } why ? new VmspaceFailed(why) : Ready.Instance)); // PreStart registered guest RAM
        Receive<GetStats>(_ => Sender.Tell(new Stats(
            _memory.Segments.Aggregate(0UL, (a, s) => a + s.Size), ResidentBytes(), _reads, _writes, _faults)
        {
            Paging = PagingStats(),
            WiredBytes = _memory.LockedBytes,
            FlushedPages = _flushedPages,
            Dirty = new DirtyStats(_dirty.Mode.ConfigName(), _barrierHarvests, _ringFullHarvests, _harvestedGfns, _ringOverflows),
            Restore = RestoreStats(),
        }));
        Receive<SaveMemory>(OnSaveMemory);
        Receive<TrackWrites>(OnTrackWrites);

        Receive<DeviceProtocol.FlushGuestPage>(OnFlushPage);
        Receive<NestedPageFault>(OnNestedPageFault);
        Receive<ReaderFailed>(f => Fail($"userfaultfd reader: {f.Reason}"));

        Receive<ClearAccessed>(c => WithPages(c.Id, new GuestPhysAddr(c.Gpa), c.Length, needPaging: true, (pager, first, count) =>
        {
            if (!pager.AccessedDirty.ClearAccessed(first, count)) { Refuse(c.Id, $"no accessed-bit emulation: {pager.Features}"); return; }
            AwaitEptInvalidation(Sender, g => new AccessedCleared(c.Id, g));
        }));
        Receive<ClearDirty>(c => WithPages(c.Id, new GuestPhysAddr(c.Gpa), c.Length, needPaging: _dirty.NeedsPaging, (pager, first, count) =>
        {
            if (_dirty.CannotClear(pager) is { } why) { Refuse(c.Id, why); return; }
            var replyTo = Sender;
            var generation = _barrier.Invalidate(Self);
            _dirty.Clear(pager, first, count, generation, _barrier.VcpuIds);
            AwaitGeneration(generation, replyTo, new DirtyCleared(c.Id, generation));
        }));
        Receive<ScanAccessedDirty>(s => WithPages(s.Id, new GuestPhysAddr(s.Gpa), s.Length, needPaging: false, (pager, first, count) =>
        {
            pager.RefreshUntracked();
            var gpa = pager.Ram.Gpa(first).Value;
            if (_dirty.ScanWaitsForVcpus) AwaitEptInvalidation(Sender, _ => new AccessedDirty(s.Id, gpa, _dirty.Scan(pager, first, count)));
            else Sender.Tell(new AccessedDirty(s.Id, gpa, _dirty.Scan(pager, first, count)));
        }));
        Receive<GetPmap>(p => WithPages(p.Id, new GuestPhysAddr(p.Gpa), p.Length, needPaging: false, (pager, first, count) =>
        {
            pager.RefreshUntracked();
            var pmap = pager.Pmap;
            Sender.Tell(new PmapEntries(p.Id, pager.Ram.Gpa(first).Value, pmap.Type, pmap.Flags, pmap.Snapshot(first, count)));
        }));
        Receive<SwapOut>(s => WithPages(s.Id, new GuestPhysAddr(s.Gpa), s.Length, needPaging: true, (pager, first, count) =>
        {
            if (!pager.CanSwap) { Refuse(s.Id, "no swap file configured"); return; }
            var n = pager.Reclaimer.SwapOut(first, count);
            AwaitEptInvalidation(Sender, g => new SwappedOut(s.Id, n, g));
        }));

        Receive<SampleAccessed>(s => WithPaging(s.Id, () =>
        {
            var sample = _pager!.Reclaimer.SampleAccessed(out var cleared);
            _accessedScans++;
            var pmap = _pager.Pmap;
            var target = _pager.Reclaimer.ReclaimTargetPages;
            Func<ulong, object> reply = g => new AccessedSample(s.Id, sample, pmap.ResidentPages, target, g);
            if (cleared) AwaitEptInvalidation(Sender, reply);
            else Sender.Tell(reply(_barrier.Generation));
        }));
        Receive<PageOut>(o => WithPaging(o.Id, () =>
        {
            if (!_pager!.CanSwap) { Refuse(o.Id, "no swap file configured"); return; }
            var n = _pager.Reclaimer.PageOut(o.Pages);
            _scanPageOuts += n;
            if (n > 0) AwaitEptInvalidation(Sender, g => new PagedOut(o.Id, n, g));
            else Sender.Tell(new PagedOut(o.Id, 0, _barrier.Generation));
        }));

        Receive<Hold>(OnHold);
        Receive<Release>(r =>
        {
            if (ReleaseHold(r.HoldId)) Sender.Tell(new HoldReleased(r.HoldId));
            else Refuse(r.HoldId, $"no hold {r.HoldId}");
        });
        Receive<ReleaseAllHolds>(_ =>
        {
            foreach (var id in _holds.Where(h => h.Value.Owner.Equals(Sender)).Select(h => h.Key).ToArray())
                if (ReleaseHold(id)) Sender.Tell(new HoldReleased(id));
        });
        Receive<DeviceProtocol.DeviceRestarting>(d =>
        {
            // Same ref, new incarnation: Terminated never comes, so its holds go now.
            var released = ReleaseHoldsOf(Sender);
            if (released > 0) _log.Info("vmspace: {0} restarted; released its {1} hold(s)", d.Device, released);
        });
        Receive<Terminated>(t =>
        {
            _watchedHolders.Remove(t.ActorRef);
            ReleaseHoldsOf(t.ActorRef);
        });

        Receive<RegisterVcpu>(r => _barrier.Register(r.VcpuId, r.Vcpu));
        Receive<UnregisterVcpu>(r =>
        {
            _dirty.Forget(r.VcpuId);
            _barrier.Unregister(r.VcpuId);
        });
        Receive<EptInvalidated>(a =>
        {
            // Harvested before the ack: applied before it (a clear drops them), and before the
            // barrier completes (a scan waiting on it sees them).
            if (a.DirtyGfns is { Length: > 0 } gfns)
            {
                _barrierHarvests++;
                ApplyHarvest(a.VcpuId, gfns, a.RingOverflowed);
            }
            _dirty.Acked(a.VcpuId, a.Generation);
            _barrier.Ack(a.VcpuId, a.Generation);
        });
        Receive<DirtyRingHarvested>(h =>
        {
            _ringFullHarvests++;
            ApplyHarvest(h.VcpuId, h.Gfns, h.RingOverflowed);
        });
        Receive<SyncEpt>(s => AwaitEptInvalidation(Sender, g => new EptSynced(s.Id, g)));
        Receive<FaultProtocol.FailNestedPageFaults>(OnFailFaults);
        Receive<FaultProtocol.Crash>(Faults.Crash); // the VM stops, naming the vmspace
        Receive<FaultProtocol.Stall>(s => Faults.StallThread(s, Context, "vmspace"));
    }

    protected override void PreStart()
    {
        if (_dirty.Unusable is { } why)
        {
            Fail(why);
            return;
        }
        if (_options.Restore is { } restore)
        {
            try
            {
                _restore = RestoreImage.Open(_memory, restore);
                if (!restore.Lazy)
                {
                    _restore.LoadAll(_ram);
                    _restore.Dispose();
                }
            }
            catch (Exception e)
            {
                _restore?.Dispose();
                _restore = null;
                _restoreFailure = $"cannot restore guest memory from {restore.Path}: {e.Message}";
                Fail(_restoreFailure);
                return;
            }
        }
        var lazy = _restore is { Source.Lazy: true };
        if (!_options.Userfaultfd && !lazy) return; // the pager (and its pmap) is built on first use
        try
        {
            _pager = new GuestPager(_memory, _options, restore: lazy ? _restore : null);
            if (_restore is { Source.Lazy: false }) ApplySavedDirty(_pager, _restore);
        }
        catch (Exception e)
        {
            Fail($"cannot start paging: {e.Message}");
            return;
        }
        _log.Info("vmspace paging: {0}", _pager.Features);
        var self = Self;
        _pager.StartReader(
            (gpa, kind, write) => self.Tell(new NestedPageFault(gpa.Value, kind, write), ActorRefs.NoSender),
            e => self.Tell(new ReaderFailed(e.Message), ActorRefs.NoSender));
        if (_options.ScanInterval > TimeSpan.Zero)
        {
            if (_pager.CanSwap)
                Context.ActorOf(SwapperProtocol.Props(Self, new SwapperProtocol.Options(_options.ScanInterval, _options.ColdScans)), "swapper");
            else _log.Warning("vmspace: no swapper: a scan interval needs a swap file");
        }
    }

    protected override void PostStop()
    {
        try { _writeLog?.StopAll(); }
        catch (KvmException) { /* the VM is going: its memslots with it */ }
        _pager?.Dispose();
        base.PostStop();
    }

    private bool Paging => _pager is { Paging: true } && _failure is null;

    // ---------------------------------------------------------------- reads and writes

    private void OnRead(ReadMemory r)
    {
        _reads++;
        if (r.Length < 0 || r.Length > MaxTransfer)
        {
            Fault(r.Id, r.Address, r.Length, $"length {r.Length} is outside 0..{MaxTransfer}");
            return;
        }
        var data = new byte[r.Length];
        bool ok;
        if (Paging)
        {
            if (!Try(() => _pager!.Host.TryRead(new GuestPhysAddr(r.Address), data), "read of guest memory", out ok)) { Fault(r.Id, r.Address, r.Length, _failure!); return; }
        }
        else ok = _memory.TryRead(new GuestPhysAddr(r.Address), data);
        if (ok) Sender.Tell(new MemoryData(r.Id, r.Address, data));
        else Fault(r.Id, r.Address, r.Length, "outside guest memory");
    }

    private void OnWrite(WriteMemory w)
    {
        _writes++;
        var a = new GuestPhysAddr(w.Address);
        if (w.Data.Length > MaxTransfer) { Fault(w.Id, w.Address, w.Data.Length, "too long"); return; }
        if (IsReadOnly(a, (ulong)w.Data.Length)) { Fault(w.Id, w.Address, w.Data.Length, "read-only memory"); return; }
        bool ok;
        if (Paging)
        {
            if (!Try(() => _pager!.Host.TryWrite(a, w.Data), "write of guest memory", out ok)) { Fault(w.Id, w.Address, w.Data.Length, _failure!); return; }
            if (ok) MaybeReclaim();
            if (ok) MaybeFinishRestore();
        }
        else ok = _memory.TryWrite(a, w.Data);
        if (ok && w.Data.Length > 0 && _ram.TryPages(a, (ulong)w.Data.Length, out var first, out var count))
        {
            _dirty.HostWrote(first, count); // KVM's logs see only the guest's writes
            _memory.Written(a, (ulong)w.Data.Length);
        }
        if (ok) Sender.Tell(new MemoryWritten(w.Id));
        else Fault(w.Id, w.Address, w.Data.Length, "outside guest memory");
    }

    /// <summary>
    /// A device's page flush (pc-testdev, port 0xE4): the guest view's mapping of the RAM page goes
    /// (MADV_DONTNEED; the memfd and the host view keep the page), which makes KVM's MMU notifier zap
    /// its EPT entry before madvise returns, so the guest's next access faults it in again; with
    /// demand paging the pager does it (<see cref="AdEmulation.Flush"/>). Answered when done; an address
    /// outside guest RAM is ignored (and answered too).
    /// </summary>
    private void OnFlushPage(DeviceProtocol.FlushGuestPage f)
    {
        if (_ram.TryPage(new GuestPhysAddr(f.Gpa), out var page) && Try(() => FlushPage(page), $"flush of gpa 0x{f.Gpa:X} for {f.Device}", out _))
            _flushedPages++;
        Sender.Tell(new DeviceProtocol.Completed(f.Id));
    }

    private bool FlushPage(ulong page)
    {
        if (Paging) _pager!.AccessedDirty.Flush(page);
        else _ram.RangeOf(page).DropGuestMappings(page, 1);
        return true;
    }

    private bool IsReadOnly(GuestPhysAddr a, ulong length) =>
        _memory.Segments.Any(s => s.ReadOnly && a.Value < s.End.Value && s.Base.Value < a.Value + length);

    private void Fault(long id, ulong address, int length, string reason)
    {
        _faults++;
        Sender.Tell(new MemoryFault(id, address, length, reason));
    }

    /// <summary>Bytes the host has allocated for the backing memfds (untouched pages cost nothing).</summary>
    private ulong ResidentBytes() =>
        _memory.Segments.Select(s => s.Backing).Distinct().Aggregate(0UL, (a, r) => a + r.AllocatedBytes);

    // ---------------------------------------------------------------- faults

    private void OnNestedPageFault(NestedPageFault f)
    {
        // After a failure the userfaultfd is unregistered: its faulters were woken and fault normally.
        if (!Paging) return;
        if (_failFaults is { } inject && (inject.Gpa is not { } page || page >> 12 == f.Gpa >> 12))
        {
            _failFaults = inject.Count > 1 ? inject with { Count = inject.Count - 1 } : null;
            Fail($"{f.Kind} fault at gpa 0x{f.Gpa:X} ({(f.Write ? "write" : "read")}) failed: injected fault: {inject.Reason}");
            return;
        }
        // A fault that brings a page in makes room first: residency never exceeds the limit.
        var gpa = new GuestPhysAddr(f.Gpa);
        if (_pager!.Faults.Allocates(gpa)) MaybeReclaim(reserve: 1);
        if (!Paging) return;
        if (Try(() => { _pager!.Faults.Resolve(gpa, f.Kind, f.Write); return true; }, $"{f.Kind} fault at gpa {gpa}", out _))
        {
            MaybeReclaim();
            MaybeFinishRestore();
        }
    }

    /// <summary>Direct reclaim down to the target when residency (+ <paramref name="reserve"/>
    /// pages about to come in) is above the limit.</summary>
    private void MaybeReclaim(ulong reserve = 0)
    {
        if (!Paging) return;
        if (Try(() => _pager!.Reclaimer.Reclaim(reserve), "reclaim", out var swapped) && swapped > 0)
            _barrier.Invalidate(Self); // nobody waits on a reclaim, but vcpus must still see it
    }

    /// <summary>Fault injection: arms the failure of the next nested page faults.</summary>
    private void OnFailFaults(FaultProtocol.FailNestedPageFaults f)
    {
        if (f.Count <= 0) { Sender.Tell(new FaultProtocol.NotInjected($"a count of {f.Count} page faults fails nothing")); return; }
        if (!Paging)
        {
            Sender.Tell(new FaultProtocol.NotInjected(_failure is not null
                ? $"the vmspace already failed: {_failure}"
                : "this vmspace takes no nested page faults (demand paging is off)"));
            return;
        }
        _failFaults = f;
        var where = f.Gpa is { } gpa ? $" on the page of gpa 0x{gpa:X}" : "";
        _log.Warning("vmspace: the next {0} nested page fault(s){1} will fail: {2}", f.Count, where, f.Reason);
        Sender.Tell(new FaultProtocol.Injected($"the next {f.Count} nested page fault(s){where} will fail"));
    }

    // ---------------------------------------------------------------- holds

    private void OnHold(Hold h)
    {
        // A hold lasts as long as its holder: the temporary actor of an Ask dies with the answer,
        // so its hold would be gone before the asker could use it.
        if (IsTemporary(Sender))
        {
            Refuse(h.Id, "a hold needs a holder that lives on: send Hold from an actor (Tell), not with Ask, whose temporary sender dies with the answer and would release it at once");
            return;
        }
        GrantHold(h);
    }

    private static bool IsTemporary(IActorRef actor) =>
        !actor.IsNobody() && actor.Path.Elements is [ "temp", .. ];

    private void GrantHold(Hold h) => WithPages(h.Id, new GuestPhysAddr(h.Gpa), h.Length, needPaging: false, (pager, first, count) =>
    {
        if (!Try(() => { pager.Holds.Hold(first, count); return true; }, "hold", out _)) { Refuse(h.Id, _failure!); return; }
        var lease = new GpaHold(++_nextHoldId, h.Gpa, h.Length);
        _holds[lease.HoldId] = new HoldEntry(lease, Sender, first, count);
        if (!Sender.IsNobody() && _watchedHolders.Add(Sender)) Context.Watch(Sender);
        Sender.Tell(new HoldGranted(h.Id, lease));
        MaybeReclaim();
        MaybeFinishRestore();
    });

    /// <summary>Releases every hold of <paramref name="owner"/>; returns how many.</summary>
    private int ReleaseHoldsOf(IActorRef owner)
    {
        var ids = _holds.Where(h => h.Value.Owner.Equals(owner)).Select(h => h.Key).ToArray();
        foreach (var id in ids) ReleaseHold(id);
        return ids.Length;
    }

    private bool ReleaseHold(long holdId)
    {
        if (!_holds.Remove(holdId, out var entry)) return false;
        _pager?.Holds.Release(entry.FirstPage, entry.Pages);
        // The holder may have written through the host view until now: a write log must see it.
        _memory.Written(new GuestPhysAddr(entry.Lease.Gpa), entry.Lease.Length);
        return true;
    }

    // ---------------------------------------------------------------- EPT barrier

    /// <summary>
    /// The EPT-generation barrier (the seed's pmap_invalidate_ept): a change the
    /// vcpus must see (write-protect, unmap for A/D or swap) is reported complete only after the
    /// generation was bumped, <see cref="InvalidateEpt"/> went to every registered vcpu, and all of
    /// them acked. The kernel change itself is already done (with KVM, mmu notifiers have zapped
    /// the EPT entries); what waits here is the per-vcpu work (e.g. a dirty-ring harvest).
    /// </summary>
    private void AwaitEptInvalidation(IActorRef replyTo, Func<ulong, object> reply)
    {
        var self = Self;
        var generation = _barrier.Invalidate(self);
        _barrier.WhenComplete(generation, () => replyTo.Tell(reply(generation), self));
    }

    /// <summary>Answers <paramref name="replyTo"/> once every vcpu acked <paramref name="generation"/>.</summary>
    private void AwaitGeneration(ulong generation, IActorRef replyTo, object reply)
    {
        var self = Self;
        _barrier.WhenComplete(generation, () => replyTo.Tell(reply, self));
    }

    // ---------------------------------------------------------------- snapshot and restore

    /// <summary>A lazy restore whose file has no page left: close it (and, restore-only, the userfaultfd).</summary>
    private void MaybeFinishRestore()
    {
        if (_pager is not { Restore: { PendingPages: 0, Closed: false } }) return;
        if (Try(() => _pager.FinishRestoreIfDone(), "closing the finished restore", out _))
            _log.Info("vmspace: lazy restore complete ({0} pages restored){1}", _pager.Restore.RestoredPages,
                _pager.RestoreOnly ? "; userfaultfd closed: the vmspace is unpaged from now on" : "");
    }

    /// <summary>Eager restore with dirty-bit emulation and an A/D file: pages saved clean are clean
    /// again (write-protected, M clear); the rest stay dirty as loaded.</summary>
    private static void ApplySavedDirty(GuestPager pager, RestoreImage restore)
    {
        if (!pager.TracksDirty || restore.Source.AccessedDirtyPath is null) return;
        var clean = new List<ulong>();
        for (var p = 0UL; p < pager.Ram.Total; p++)
            if (pager.Pmap.IsValid(p) && restore.SavedDirty(p) == false) clean.Add(p);
        pager.WriteProtect(clean, protect: true);
        foreach (var p in clean) pager.Pmap.SetModified(p, false);
    }

    private RestoreStats RestoreStats()
    {
        if (_restore is null) return VmspaceProtocol.RestoreStats.None;
        var mode = !_restore.Source.Lazy ? "eager"
            : _pager is not { RestoreOnly: true } ? "lazy"
            : _restore.Closed && _restore.PendingPages == 0 ? "lazy-complete" : "lazy-restore-only";
        return new RestoreStats(mode, _restore.ImagePages, _restore.RestoredPages, _restore.PendingPages);
    }

    /// <summary>
    /// Writes the memory file (see <see cref="SaveMemory"/>): the memfds' data extents straight from
    /// the host view (pwrite from the mapping), swapped pages and pages still in a lazy restore's
    /// file by copy_file_range; then the A/D file if asked and paging. The vcpus are paused: nothing
    /// else changes guest memory meanwhile (devices' writes come through this mailbox).
    /// </summary>
    private void OnSaveMemory(SaveMemory s)
    {
        if (s.WrittenOnly)
        {
            SaveWritten(s);
            return;
        }
        // A new round of that log: what was written before now is in the file written next.
        if (s.Log is { } name && _writeLog is { } log && log.IsOn(name))
        {
            try { log.Take(name, []); }
            catch (KvmException e)
            {
                Sender.Tell(new MemorySaved(s.Id, 0, 0, $"saving guest memory failed: KVM's dirty log could not be read: {e.Message}"));
                return;
            }
        }
        var tmp = s.Path + ".tmp";
        var adTmp = s.AccessedDirtyPath is null ? null : s.AccessedDirtyPath + ".tmp";
        try
        {
            var (pages, bytes) = WriteMemoryFile(tmp);
            string? adPath = null;
            if (s.AccessedDirtyPath is { } ad && Paging)
            {
                var pager = _pager!;
                var scan = _dirty.ScanWaitsForVcpus ? pager.AccessedDirty.Scan(0, pager.Ram.Total) : _dirty.Scan(pager, 0, pager.Ram.Total);
                MemoryImage.WriteAccessedDirty(adTmp!, scan);
                File.Move(adTmp!, ad, overwrite: true);
                adPath = ad;
            }
            File.Move(tmp, s.Path, overwrite: true);
            _log.Info("vmspace: saved {0} pages of guest memory to {1}", pages, s.Path);
            Sender.Tell(new MemorySaved(s.Id, pages, bytes, null) { AccessedDirtyPath = adPath });
        }
        catch (Exception e)
        {
            foreach (var f in new[] { tmp, adTmp })
                try { if (f is not null && File.Exists(f)) File.Delete(f); } catch (IOException) { /* reported below */ }
            _log.Error("vmspace: saving guest memory to {0} failed: {1}", s.Path, e.Message);
            Sender.Tell(new MemorySaved(s.Id, 0, 0, $"saving guest memory to {s.Path} failed: {e.GetType().Name}: {e.Message}"));
        }
    }

    private void OnTrackWrites(TrackWrites t)
    {
        string? error = null;
        if (!t.On)
        {
            try { _writeLog?.Stop(t.Log); }
            catch (KvmException e) { error = $"KVM would not stop logging writes: {e.Message}"; }
        }
        else if (_writeLog is null) error = "this vmspace was given no KVM VM whose writes it could log";
        else if (_dirty.Mode != DirtyTracking.UffdWp)
            error = $"the VM's dirty tracking ({_dirty.Mode.ConfigName()}) already uses KVM's dirty log";
        else
        {
            try { _writeLog.Start(t.Log); }
            catch (KvmException e) { error = $"KVM would not log writes: {e.Message}"; }
        }
        if (error is not null) _log.Warning("vmspace: {0}", error);
        Sender.Tell(new WritesTracked(t.Id, error));
    }

    /// <summary>
    /// A <see cref="SaveMemory.WrittenOnly"/> save: the pages written since the last save go into the
    /// earlier save's file, which becomes <see cref="SaveMemory.Path"/>. The A/D file, if asked, is
    /// written whole as in a full save.
    /// </summary>
    private void SaveWritten(SaveMemory s)
    {
        var from = s.From ?? s.Path;
        try
        {
            if (s.Log is not { } name || _writeLog is not { } log || !log.IsOn(name))
                throw new VmspaceException($"writes are not tracked for {s.Log ?? "this save"}: no earlier save to complete");
            var pages = log.Take(name, _holds.Values.Select(h => (h.FirstPage, h.Pages)));
            using (var file = File.OpenHandle(from, FileMode.Open, FileAccess.ReadWrite, FileShare.None))
            {
                if ((ulong)RandomAccess.GetLength(file) != MemoryImage.Length(_memory))
                    throw new VmspaceException($"{from} is not a memory file of this VM");
                var pager = Paging ? _pager : null;
                RamWriteLog.CopyInto(file, _ram, pages, p => pager?.Pmap.IsSwapped(p) ?? false, pager?.Swap?.Handle);
                RandomAccess.FlushToDisk(file);
            }
            string? adPath = null;
            if (s.AccessedDirtyPath is { } ad && Paging)
            {
                var pager = _pager!;
                var scan = _dirty.ScanWaitsForVcpus ? pager.AccessedDirty.Scan(0, pager.Ram.Total) : _dirty.Scan(pager, 0, pager.Ram.Total);
                MemoryImage.WriteAccessedDirty(ad, scan);
                adPath = ad;
            }
            if (from != s.Path) File.Move(from, s.Path, overwrite: true);
            Sender.Tell(new MemorySaved(s.Id, pages.Count, (long)MemoryImage.Length(_memory), null) { AccessedDirtyPath = adPath, Written = [.. pages] });
        }
        catch (Exception e) when (e is VmspaceException or KvmException or IOException or UnauthorizedAccessException)
        {
            _log.Error("vmspace: saving the written pages of guest memory to {0} failed: {1}", from, e.Message);
            Sender.Tell(new MemorySaved(s.Id, 0, 0, $"saving guest memory to {s.Path} failed: {e.GetType().Name}: {e.Message}"));
        }
    }

    private (long Pages, long Bytes) WriteMemoryFile(string path)
    {
        const ulong page = RamPages.PageSize;
        using var file = File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite, FileShare.None);
        var length = MemoryImage.Length(_memory);
        RandomAccess.SetLength(file, (long)length);
        var pages = 0L;
        foreach (var r in _ram.Ranges)
            foreach (var (offset, len) in r.Backing.DataRanges(r.Segment.BackingOffset, r.Pages * page))
            {
                WriteFromHostView(file, r.Backing, offset, len, (r.FirstPage + (offset - r.Segment.BackingOffset) / page) * page);
                pages += (long)(len / page);
            }
        if (Paging && _pager is { } pager)
        {
            if (pager.Swap is { } swap)
            {
                var swapped = new List<ulong>();
                for (var p = 0UL; p < pager.Ram.Total; p++)
                    if (pager.Pmap.IsSwapped(p)) swapped.Add(p);
                foreach (var (_, first, count) in pager.Ram.Coalesce(swapped))
                {
                    SparseFiles.Copy(swap.Handle, (long)SwapStore.Offset(first), file, (long)(first * page), (long)(count * page));
                    pages += (long)count;
                }
            }
            if (pager.Restore is { Closed: false } restore)
                foreach (var (first, count) in restore.PendingRuns())
                {
                    SparseFiles.Copy(restore.File, (long)(first * page), file, (long)(first * page), (long)(count * page));
                    pages += (long)count;
                }
        }
        foreach (var (region, fileOffset) in MemoryImage.ReadOnlyParts(_memory))
            foreach (var (offset, len) in region.DataRanges(0, region.Size))
            {
                WriteFromHostView(file, region, offset, len, fileOffset + offset);
                pages += (long)(len / page);
            }
        RandomAccess.FlushToDisk(file);
        return (pages, (long)length);
    }

    /// <summary>pwrite of [offset, offset+length) of a memfd, straight from its host view, in ≤ 1 GiB pieces.</summary>
    private static void WriteFromHostView(Microsoft.Win32.SafeHandles.SafeFileHandle file, MemfdRegion region, ulong offset, ulong length, ulong fileOffset)
    {
        const ulong piece = 1UL << 30;
        for (var done = 0UL; done < length; done += piece)
        {
            var n = Math.Min(piece, length - done);
            RandomAccess.Write(file, region.HostSpan(offset + done, (int)n), (long)(fileOffset + done));
        }
    }

    // ---------------------------------------------------------------- dirty rings

    /// <summary>What vcpu <paramref name="vcpuId"/> harvested from its ring: GFNs (of RAM pages, the
    /// rest is ignored). A ring found full may have lost writes (see <see cref="DirtyRing"/>).</summary>
    private void ApplyHarvest(int vcpuId, ulong[] gfns, bool overflowed)
    {
        _harvestedGfns += gfns.Length;
        if (!_dirty.Harvested(vcpuId, gfns, overflowed)) return;
        _ringOverflows++;
        _log.Warning("vcpu {0}'s dirty ring was full: KVM may have lost writes, so every guest RAM page is reported dirty " +
                     "(give the rings more entries: actorvmm.vm.paging.dirty-ring-entries)", vcpuId);
    }

    // ---------------------------------------------------------------- helpers

    /// <summary>Runs <paramref name="action"/>(pager, first page, page count) on the RAM pages of
    /// [gpa, gpa+length), building the pager (and its pmap) first if paging is off; refuses a range
    /// that is not contiguous RAM. A failure in it fails the vmspace.</summary>
    private void WithPages(long id, GuestPhysAddr gpa, ulong length, bool needPaging, Action<GuestPager, ulong, ulong> action)
    {
        if (_failure is not null) { Refuse(id, $"vmspace failed: {_failure}"); return; }
        if (_pager is null && !_options.Userfaultfd)
        {
            try { _pager = new GuestPager(_memory, _options); }
            catch (Exception e) { Fail($"cannot build the pmap: {e.Message}"); }
        }
        if (_pager is null) { Refuse(id, $"vmspace has no pager: {_failure}"); return; }
        if (needPaging && !_pager.Paging) { Refuse(id, "demand paging is off (vmspace built without userfaultfd)"); return; }
        if (!_pager.Ram.TryPages(gpa, length, out var first, out var count))
        {
            Refuse(id, $"{gpa}+0x{length:X} is not a contiguous range of guest RAM");
            return;
        }
        try
        {
            action(_pager, first, count);
        }
        catch (Exception e)
        {
            Fail($"{e.GetType().Name}: {e.Message}");
            Refuse(id, $"vmspace failed: {_failure}");
        }
    }

    private bool Try<T>(Func<T> action, string what, out T result)
    {
        try
        {
            result = action();
            return true;
        }
        catch (Exception e)
        {
            Fail($"{what}: {e.Message}");
            result = default!;
            return false;
        }
    }

    private void Refuse(long id, string reason) => Sender.Tell(new Refused(id, reason));

    /// <summary>Runs <paramref name="action"/> if demand paging is on, else refuses; a failure in it fails the vmspace.</summary>
    private void WithPaging(long id, Action action)
    {
        if (!Paging)
        {
            Refuse(id, _failure is not null ? $"vmspace failed: {_failure}" : "demand paging is off (vmspace built without userfaultfd)");
            return;
        }
        try
        {
            action();
        }
        catch (Exception e)
        {
            Fail($"{e.GetType().Name}: {e.Message}");
            Refuse(id, $"vmspace failed: {_failure}");
        }
    }

    /// <summary>Paging --error--> Failed: report to the VM, stop paging, keep serving memory.</summary>
    private void Fail(string reason)
    {
        if (_failure is not null) return;
        _failure = reason;
        _log.Error("vmspace failed: {0}", reason);
        _events.Tell(new VmspaceFailed(reason), Self);
        try { _pager?.Dispose(); }
        catch (Exception e) { _log.Error(e, "vmspace: cleanup after failure"); }
    }

    private PagingStats PagingStats()
    {
        // Without userfaultfd only the superpages need the pmap: build it when RAM may have them.
        if (_pager is null && !_options.Userfaultfd && _failure is null && _memory.Segments.Any(s => !s.ReadOnly && s.Backing.HugePagesAdvised))
        {
            try { _pager = new GuestPager(_memory, _options); }
            catch (Exception e) { _log.Error(e, "vmspace: cannot build the pmap"); }
        }
        var p = _pager;
        if (p is null)
            return VmspaceProtocol.PagingStats.Off with { Failure = _failure, Superpages = GuestPager.SuperpageSupport(_memory, _options.Userfaultfd).Why };
        if (!p.Paging)
        {
            try { p.RefreshUntracked(); }
            catch (Exception e) { _log.Error(e, "vmspace: cannot refresh the pmap"); }
        }
        return new PagingStats(p.Paging && _failure is null, p.Features, p.Ram.Total, p.Pmap.ResidentPages, p.Pmap.SwappedPages,
            p.Holds.HeldPages, p.Pmap.AccessedPages, p.Pmap.DirtyPages, p.Faults.MissingFaults, p.Faults.MinorFaults, p.Faults.WriteProtectFaults,
            p.Faults.ZeroFills, p.SwapIns, p.SwapOuts, p.Faults.Retries, p.Reclaimer.Reclaims, _barrier.Generation, _failure)
        {
            PeakResidentPages = p.Pmap.PeakResidentPages,
            ResidentLimitPages = p.Reclaimer.ResidentLimitPages,
            ScanInterval = Context.Child("swapper").IsNobody() ? TimeSpan.Zero : _options.ScanInterval,
            AccessedScans = _accessedScans,
            ScanPageOuts = _scanPageOuts,
            Superpages = p.Superpages,
            SuperpagePages = p.Pmap.SuperpageBackedPages,
        };
    }
}
