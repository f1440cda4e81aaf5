using Akka.Actor;
using Akka.Actor.Internal;
using Akka.Event;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Lapic;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using static ActorVmm.Host.Vm.VmProtocol;

namespace ActorVmm.Host.Vm;

/// <summary>
/// One VM: creates and supervises its vmspace, devices, vcpus and (with a LAPIC backend) their
/// vlapics and the APIC router, wires the interrupt paths, and decides how the VM ends.
/// Devices restart on failure (the default strategy); a vcpu never throws to it (it reports
/// <see cref="VcpuProtocol.Stopped"/>), and a vcpu that dies anyway ends the VM.
/// What it creates and how the devices are routed is decided by <see cref="VmBuilder"/>
/// (<see cref="VmResources.Wiring"/>); the VM actor only creates the actors and binds the routes.
/// </summary>
internal sealed class VmActor : ReceiveActor, IWithTimers
{
    private sealed record EndTimeout : INotTraced { public static readonly EndTimeout Instance = new(); }

    private static readonly TimeSpan EndGrace = TimeSpan.FromSeconds(3);

    private readonly VmResources _resources;
    private readonly TaskCompletionSource<Outcome> _ended;
    private readonly List<IActorRef> _vcpus = [];
    private readonly HashSet<int> _started = [];
    private readonly HashSet<int> _haltedForever = [];
    private readonly HashSet<int> _stopped = [];
    private readonly List<IActorRef> _watchers = [];
    private readonly List<IActorRef> _devices = [];
    /// <summary>Children that restart from their state record when they fail (devices, vlapics, the APIC router).</summary>
    private readonly HashSet<IActorRef> _restartable = [];
    /// <summary>Devices that have not yet answered the drain, by the drain's id (null: not draining).</summary>
    private Dictionary<long, IActorRef>? _draining;
    private Phase _phase = Phase.Created;
    private Outcome? _outcome;

    public ITimerScheduler Timers { get; set; } = null!;

    public VmActor(VmResources resources, TaskCompletionSource<Outcome> ended)
    {
        _resources = resources;
        _ended = ended;

        Receive<Start>(_ =>
        {
            // With demand paging, wait until the vmspace has registered guest memory with
            // userfaultfd, so no first touch goes unseen.
            // A restored VM also waits for its memory: a lazy restore registered, an eager one copied.
            if (_resources.Paging is { Userfaultfd: true } or { Restore: not null }) _vmspace.Tell(VmspaceProtocol.AwaitReady.Instance);
            else StartBootVcpu();
        });
        Receive<VmspaceProtocol.Ready>(_ =>
        {
            StartupTimes.Mark("memory ready");
            if (_resources.Restore is not null) AwaitRestoredDevices();
            else StartBootVcpu();
        });
        Receive<VmspaceProtocol.VmspaceFailed>(f =>
            End(new Outcome(OutcomeKind.VcpuError, Outcome.VcpuErrorCode, $"the vmspace failed: {f.Reason}")));
        Receive<TakeSnapshot>(OnTakeSnapshot);
        Receive<TrackMemoryWrites>(t =>
        {
            if (MemoryBusy() is { } why) Sender.Tell(new VmspaceProtocol.WritesTracked(0, why));
            else _vmspace.Forward(new VmspaceProtocol.TrackWrites(0, t.On, t.Log));
        });
        Receive<CopyMemory>(c =>
        {
            if (MemoryBusy() is { } why) Sender.Tell(new VmspaceProtocol.MemorySaved(0, 0, 0, why));
            else _vmspace.Forward(new VmspaceProtocol.SaveMemory(0, c.Path) { WrittenOnly = c.WrittenOnly, Log = c.Log });
        });
        Receive<SnapshotTaker.Done>(OnSnapshotDone);
        Receive<SnapshotTaker.Failed>(f => EndSnapshot(new SnapshotFailed(_resources.Name, f.Directory, f.Reason), stop: false));
        Receive<Pause>(_ =>
        {
            // During a snapshot: the VM stays paused after it.
            if (_snapshot is { } taking) _snapshot = taking with { WasPaused = true };
            if (_phase != Phase.Running || _snapshot is not null) return;
            _phase = Phase.Paused;
            foreach (var v in _vcpus) v.Tell(VcpuProtocol.Pause.Instance);
        });
        Receive<Resume>(_ =>
        {
            // During a snapshot: the VM resumes after it (unless it stops then).
            if (_snapshot is { } taking) _snapshot = taking with { WasPaused = false };
            if (_phase != Phase.Paused || _snapshot is not null) return;
            _phase = Phase.Running;
            foreach (var v in _vcpus) v.Tell(VcpuProtocol.Resume.Instance);
        });
        Receive<VmProtocol.Stop>(s => End(new Outcome(OutcomeKind.Stopped, Outcome.StoppedCode, s.Reason)));
        Receive<WatchEnd>(_ =>
        {
            if (_phase == Phase.Ended && _outcome is not null) Sender.Tell(new Ended(_resources.Name, _outcome));
            else _watchers.Add(Sender);
        });
        Receive<GetStatus>(_ => Sender.Tell(new VmProtocol.Status(_resources.Name, _phase, _vcpus.Count, _outcome,
            [.. _devices.Select(d => d.Path.Name)], [.. _restarts.ToArray().Select(r => $"{r.Child}: {r.Cause}")], _migration)));
        Receive<RecordMigration>(m => _migration = m.Report);

        Receive<DeviceProtocol.GuestExitRequested>(e =>
            End(new Outcome(OutcomeKind.DebugExit, e.Status, $"guest wrote {e.Status >> 1} to {e.Device}: exit status {e.Status}")));
        Receive<DeviceProtocol.GuestResetRequested>(e =>
            End(new Outcome(OutcomeKind.Reset, Outcome.ResetCode, $"guest requested a reset ({e.Reason})")));
        Receive<DeviceProtocol.GuestPowerOffRequested>(e =>
            End(new Outcome(OutcomeKind.PowerOff, Outcome.PowerOffCode, $"guest powered off ({e.Reason})")));

        Receive<VcpuProtocol.VcpuHalted>(h =>
        {
            _haltedForever.Add(h.VcpuId);
            if (_started.IsSubsetOf(_haltedForever))
                End(new Outcome(OutcomeKind.Halted, Outcome.HaltedCode,
                    $"vcpu {string.Join(", ", _haltedForever.Order())} halted with interrupts disabled"));
        });
        Receive<VcpuProtocol.Stopped>(s =>
        {
            _stopped.Add(s.VcpuId);
            ForgetVcpu(s.VcpuId);
            var outcome = s.Reason switch
            {
                VcpuProtocol.StopReason.Requested => null,
                VcpuProtocol.StopReason.TripleFault => new Outcome(OutcomeKind.TripleFault, Outcome.TripleFaultCode, s.Report),
                _ => new Outcome(OutcomeKind.VcpuError, Outcome.VcpuErrorCode, s.Report),
            };
            if (outcome is not null) End(outcome);
            TryFinish();
        });
        Receive<VcpuProtocol.VcpuWoken>(w => _haltedForever.Remove(w.VcpuId)); // an NMI or INIT woke it
        Receive<VcpuProtocol.StartedBySipi>(s =>
        {
            // An AP brought up by INIT-SIPI counts among the vcpus whose halt ends the VM.
            _started.Add(s.VcpuId);
            _haltedForever.Remove(s.VcpuId);
        });
        Receive<VcpuProtocol.Restored>(r =>
        {
            StartupTimes.Mark("vcpu restored");
            // Under KVM's local APIC every vcpu enters KVM_RUN (an AP waits for its SIPI in the kernel).
            if (_resources.KernelApic is not null || r.State is VcpuProtocol.State.Running or VcpuProtocol.State.Halted)
                _started.Add(r.VcpuId);
        });
        Receive<VcpuProtocol.Paused>(_ => { });
        Receive<VcpuProtocol.Resumed>(_ => { });
        Receive<ChildFailed>(f => _failures[f.Child] = f.Cause);
        Receive<ChildRestarted>(r => _restarts.Add(r));
        Receive<Terminated>(t =>
        {
            var name = t.ActorRef.Path.Name;
            var why = _failures.TryGetValue(name, out var cause) ? $": {cause}" : "";
            var index = _vcpus.IndexOf(t.ActorRef);
            if (index >= 0)
            {
                _stopped.Add(index);
                ForgetVcpu(index);
                End(new Outcome(OutcomeKind.VcpuError, Outcome.VcpuErrorCode, $"{name} (vcpu {index}) failed and was stopped{why}"));
                TryFinish();
                return;
            }
            // A device or the vmspace gone for good (it kept failing): reads to it would never be
            // answered, so the VM cannot go on.
            _gone.Add(t.ActorRef);
            if (RemoveDrained(d => d.Equals(t.ActorRef)) && _draining!.Count == 0) Finish();
            End(new Outcome(OutcomeKind.VcpuError, Outcome.VcpuErrorCode, $"{name} failed and was stopped{why}"));
        });
        Receive<MapDeviceMmio>(OnMapDeviceMmio);
        Receive<VcpuProtocol.MmioMapped>(OnMmioMapped);
        Receive<EndTimeout>(_ => Finish());
        Receive<DeviceProtocol.Completed>(c =>
        {
            if (_startBarrier is { } barrier && barrier.Remove(c.Id))
            {
                if (barrier.Count == 0) StartWhenMmioMoved();
                return;
            }
            if (_draining is null || !_draining.Remove(c.Id)) return;
            if (_draining.Count == 0) Finish();
        });
    }

    /// <summary>Supervision (<see cref="Supervision"/>): by exception type, then by what the child can
    /// be rebuilt from; a restarted child restarts at most <see cref="MaxDeviceRestarts"/> times a
    /// minute, then it stops and so does the VM.</summary>
    protected override SupervisorStrategy SupervisorStrategy() => new VmSupervisorStrategy(Self, _restartable.Contains);

    public const int MaxDeviceRestarts = 10;

    /// <summary>How long a device's node may take to build it before the device runs on the VM's node
    /// instead (generous: the first message between two nodes builds their serializers, seconds on a
    /// slow machine).</summary>
    public static readonly TimeSpan RemoteDevicePlacementTimeout = TimeSpan.FromSeconds(60);

    /// <summary>A child's failure, recorded for the report of its Terminated.</summary>
    private sealed record ChildFailed(string Child, string Cause);

    private readonly Dictionary<string, string> _failures = new();
    /// <summary>Children restarted after a failure, oldest first (the last 100).</summary>
    private readonly BoundedList<ChildRestarted> _restarts = new(100);
    private string? _migration;

    private sealed class BoundedList<T>(int capacity)
    {
        private readonly Queue<T> _items = new();
        public void Add(T item)
        {
            if (_items.Count == capacity) _items.Dequeue();
            _items.Enqueue(item);
        }
        public T[] ToArray() => _items.ToArray();
    }

    /// <summary>How the VM answers a child's failure.</summary>
    internal static class Supervision
    {
        /// <summary>
        /// An <see cref="InvariantViolationException"/> stops the child, and so the VM, whatever the
        /// child: its state cannot be trusted. Any other failure restarts a child that is rebuilt from
        /// its state record (<paramref name="restartable"/>: a device, a vlapic, the APIC router), and
        /// stops any other (a vcpu, the vmspace: their state is KVM's and the guest's, and a restart
        /// would lose what was in flight), and the VM ends with a report naming it.
        /// </summary>
        public static Directive Decide(bool restartable, Exception cause) => cause switch
        {
            InvariantViolationException => Directive.Stop,
            ActorInitializationException { InnerException: InvariantViolationException } => Directive.Stop,
            _ => restartable ? Directive.Restart : Directive.Stop,
        };
    }

    private sealed class VmSupervisorStrategy(IActorRef vm, Func<IActorRef, bool> restartable)
        : OneForOneStrategy(MaxDeviceRestarts, TimeSpan.FromMinutes(1), Akka.Actor.Decider.From(Directive.Restart))
    {
        public override void ProcessFailure(IActorContext context, bool restart, IActorRef child, Exception cause,
            ChildRestartStats stats, IReadOnlyCollection<ChildRestartStats> children)
        {
            var name = child.Path.Name;
            var why = $"{cause.GetType().Name}: {cause.Message}";
            if (!restart || Supervision.Decide(restartable(child), cause) == Directive.Stop)
            {
                vm.Tell(new ChildFailed(name, why), child);
                context.Stop(child);
                return;
            }
            // Told as the child, so a trace shows "uart0 -> vm ChildRestarted" among the messages.
            vm.Tell(new ChildRestarted(name, why), child);
            base.ProcessFailure(context, restart, child, cause, stats, children);
        }

        /// <summary>One line per failure, at warning level: the VM's outcome or its trace carries
        /// the consequence. The stack only at debug level (an injected fault has none worth reading).</summary>
        protected override void LogFailure(IActorContext context, IActorRef child, Exception cause, Directive directive)
        {
            var log = context.GetLogger();
            var message = cause is ActorInitializationException { InnerException: { } inner } ? inner.Message : cause.Message;
            log.Warning("{0} failed ({1}: {2}); {3}", child.Path.Name, cause.GetType().Name, message,
                directive == Directive.Restart ? "restarting it" : "stopping it");
            if (cause is not InjectedFaultException) log.Debug("{0}", cause);
        }
    }

    /// <summary>
    /// Creation order follows the interrupt paths, so every ref exists before a message can need
    /// it: the router, the vlapics (vcpu attached later), the devices in the wiring's order (the
    /// IOAPIC and the PIC first: the other devices' IRQ lines name them), then the vcpus, each with
    /// its own routes (<see cref="VmWiring.RoutesFor"/>), and its vlapic's xAPIC page (decoded where
    /// its IA32_APIC_BASE puts it).
    /// </summary>
    protected override void PreStart()
    {
        // Traced or fault-injected VMs use the traced mailbox (it also applies link faults).
        var traced = _resources.Traced || _resources.FaultInjection;
        Props Mailbox(Props p) => traced ? p.WithMailbox(TracedMailboxType.Id) : p;
        var clock = _resources.Clock ?? new MonotonicClock();
        _clock = clock;
        var interrupts = new VmInterrupts();

        // With demand paging the vmspace resolves nested page faults while a vcpu waits in the
        // kernel: it gets a thread of its own, which answers without waiting for a pool thread.
        var vmspaceProps = _resources.Paging switch
        {
            ({ Userfaultfd: true } or { Restore.Lazy: true }) and var paging => VmspaceProtocol.Props(_resources.Memory, paging, Self, _resources.DirtyLog, _resources.Kvm)
                .WithDispatcher(VcpuProtocol.DispatcherId),
            { } options => VmspaceProtocol.Props(_resources.Memory, options, Self, _resources.DirtyLog, _resources.Kvm),
            null => VmspaceProtocol.Props(_resources.Memory, _resources.Kvm),
        };
        var vmspace = Context.ActorOf(Mailbox(vmspaceProps), "vmspace");
        Context.Watch(vmspace);
        _vmspace = vmspace;

        var vlapics = new List<IActorRef>();
        var targets = new ApicRouterProtocol.Targets();
        if (_resources.Lapic is { } backend)
        {
            // The router and the vlapics run on their senders' threads (actorvmm.vlapic-dispatcher).
            var router = Context.ActorOf(Mailbox(ApicRouterProtocol.Props(targets, _resources.KernelApic))
                .WithDispatcher(VcpuProtocol.VlapicDispatcherId), "apic-router");
            Context.Watch(router);
            _restartable.Add(router);
            interrupts.Router = router;
            foreach (var vcpu in _resources.Vcpus)
            {
                var wiring = new VlapicProtocol.Wiring(ActorRefs.Nobody, router, router, targets);
                var saved = _resources.Restore is { Vlapics.Count: > 0 } restore ? restore.Vlapics[vcpu.Id] : null;
                var vlapic = Context.ActorOf(Mailbox(VlapicProtocol.Props(vcpu.Id, wiring, backend, clock, saved))
                    .WithDispatcher(VcpuProtocol.VlapicDispatcherId), $"vlapic-{vcpu.Id}");
                Context.Watch(vlapic);
                _restartable.Add(vlapic);
                vlapics.Add(vlapic);
            }
            if (vlapics.Count > 0) interrupts.BspVlapic = vlapics[0];
            _vlapics.AddRange(vlapics);
            targets.Vlapics = vlapics;
        }

        var deviceActors = new Dictionary<DeviceSpec, IActorRef>(ReferenceEqualityComparer.Instance);
        foreach (var spec in _resources.Wiring.Devices)
        {
            var saved = _resources.Restore?.Devices.GetValueOrDefault(spec.Name);
            var vm = Self;
            Props Local(object? state) => Mailbox(DeviceProps(spec, interrupts, clock, vmspace, vm, state)).WithDispatcher(DeviceProtocol.DispatcherId);
            IActorRef device;
            if (_resources.Spec?.DeviceNodes.GetValueOrDefault(spec.Name) is { } node && spec.Hostable is { } hostable)
            {
                // A device on another node: its proxy stands here. A proxy that fails is not restarted
                // (it would place the device again and lose what was in flight): the VM ends.
                var setup = new Cluster.RemoteDevices.Setup(_resources.Name, spec.Name, hostable.Kind, Cluster.HostNode.SeedAddress(node),
                    interrupts.IoApic, interrupts.Pic, vm, hostable.Output, Local, saved, RemoteDevicePlacementTimeout);
                device = Context.ActorOf(Mailbox(Cluster.RemoteDevices.ProxyProps(setup)), spec.Name);
            }
            else
            {
                device = Context.ActorOf(Local(saved), spec.Name);
                _restartable.Add(device);
            }
            Context.Watch(device);
            deviceActors[spec] = device;
            _devices.Add(device);
            if (spec.Name == PcPlatform.IoApicName) interrupts.IoApic = device;
            else if (spec.Name == PcPlatform.PicName) interrupts.Pic = device;
        }
        targets.IoApic = interrupts.IoApic;

        foreach (var vcpu in _resources.Vcpus)
        {
            // Each vcpu gets its own routes: the write window is counted per vcpu and device.
            var (ports, mmio) = _resources.Wiring.RoutesFor(spec => deviceActors[spec]);
            IActorRef? vlapic = null;
            DeviceRoute? apicPage = null;
            var kernelLapic = _resources.KernelApic is not null;
            if (vcpu.Id < vlapics.Count)
            {
                vlapic = vlapics[vcpu.Id];
                // An in-kernel APIC answers its page itself: no exit ever reaches user space for it.
                if (!kernelLapic)
                    apicPage = new DeviceRoute($"vlapic-{vcpu.Id}", vlapic, waitForWriteAt: offset => offset == VlapicProtocol.TprOffset);
            }
            var pic = vlapic is not null && !interrupts.Pic.IsNobody() ? interrupts.Pic : null;
            var vcpuWiring = new VcpuProtocol.Wiring(ports, mmio, Self, _resources.Memory, vlapic, pic, kernelLapic && vlapic is not null,
                Vmspace: vmspace, ApicPage: apicPage) { OnFirstEntry = static (_, at) => StartupTimes.MarkAt("first instruction", at) };
            var actorRef = Context.ActorOf(VcpuProtocol.Props(vcpu, vcpuWiring, _resources.Restore?.Vcpus[vcpu.Id]), $"vcpu-{vcpu.Id}");
            Context.Watch(actorRef);
            _vcpus.Add(actorRef);
            vlapic?.Tell(new VlapicProtocol.AttachVcpu(actorRef));
            // Every vcpu takes part in the EPT barrier; even a paused or halted one acks promptly
            // (it handles messages, and harvests its dirty ring first).
            vmspace.Tell(new VmspaceProtocol.RegisterVcpu(vcpu.Id, actorRef));
        }
    }

    /// <summary>A device actor's props: its model built (and rebuilt after a failure) with the VM's
    /// interrupt wiring and clock when it asks for them.</summary>
    /// <param name="saved">the state record a restored VM's device starts from; null: power-on</param>
    /// <param name="vm">this actor (the factories run in the device actor, where this actor's context is not current)</param>
    private Props DeviceProps(DeviceSpec spec, VmInterrupts interrupts, IDeviceClock clock, IActorRef vmspace, IActorRef vm, object? saved)
    {
        var memory = _resources.Memory;
        Func<IPlatformEvents, IBusDevice> factory = spec.WiredFactory is { } wired
            ? events => wired(new DeviceContext(events, interrupts, clock, memory, vm))
            : spec.Factory;
        Func<IPlatformEvents, object, IBusDevice>? restore = spec.WiredRestore is { } rewired
            ? (events, state) => rewired(new DeviceContext(events, interrupts, clock, memory, vm), state)
            : spec.Restore;
        return spec.Timed
            ? TimedDeviceProtocol.Props(spec.Name, clock, factory, restore, vm, vmspace, initialState: saved)
            : DeviceProtocol.Props(spec.Name, factory, restore, vm, vmspace, initialState: saved);
    }

    protected override void PostStop()
    {
        // If the actor system went down before the VM ended, its watchers still learn of it.
        _ended.TrySetResult(_outcome ?? new Outcome(OutcomeKind.Stopped, Outcome.StoppedCode, "the VM actor stopped"));
    }

    private IActorRef _vmspace = ActorRefs.Nobody;
    private readonly List<IActorRef> _vlapics = [];
    private IDeviceClock _clock = null!;

    private void StartBootVcpu()
    {
        if (_phase != Phase.Created || _vcpus.Count == 0) return;
        _phase = Phase.Running;
        if (_resources.Restore is not null)
        {
            // A restored VM: every vcpu goes on from its snapshot, in the state it was saved in
            // (VcpuProtocol.Restored says which; those that ran count as started).
            foreach (var vcpu in _vcpus) vcpu.Tell(VcpuProtocol.Start.Instance);
            return;
        }
        _started.Add(0);
        _vcpus[0].Tell(VcpuProtocol.Start.Instance);
        // With in-kernel APICs KVM holds the APs in wait-for-SIPI inside KVM_RUN: they enter at once
        // and count as started when their SIPI has come (VcpuProtocol.StartedBySipi).
        if (_resources.KernelApic is not null)
            for (var i = 1; i < _vcpus.Count; i++) _vcpus[i].Tell(VcpuProtocol.Start.Instance);
    }

    /// <summary>A device's range moving on the vcpus' buses: the device, its request's id, the vcpus
    /// that have not yet moved it.</summary>
    private sealed record MmioMove(IActorRef Device, long RequestId, HashSet<int> Waiting);

    private readonly Dictionary<long, MmioMove> _mmioMoves = [];
    private long _lastMmioMove;

    /// <summary>Every vcpu that can still answer moves the range; the device hears <see cref="DeviceProtocol.Completed"/>
    /// once all have (at once without any). A vcpu that stops meanwhile is not waited for (<see cref="ForgetVcpu"/>).</summary>
    private void OnMapDeviceMmio(MapDeviceMmio m)
    {
        var id = ++_lastMmioMove;
        var waiting = Enumerable.Range(0, _vcpus.Count).Where(i => !_stopped.Contains(i)).ToHashSet();
        if (waiting.Count == 0)
        {
            Sender.Tell(new DeviceProtocol.Completed(m.Id));
            return;
        }
        _mmioMoves[id] = new MmioMove(Sender, m.Id, waiting);
        foreach (var i in waiting) _vcpus[i].Tell(new VcpuProtocol.MapMmio(id, m.Device, Sender, m.Window, m.Length, m.Base));
    }

    private void OnMmioMapped(VcpuProtocol.MmioMapped mapped)
    {
        if (!_mmioMoves.TryGetValue(mapped.Id, out var move) || !move.Waiting.Remove(mapped.VcpuId)) return;
        if (!mapped.Decoded) Context.GetLogger().Warning("vcpu {0}: a range of {1} overlaps another device's and is not decoded", mapped.VcpuId, move.Device.Path.Name);
        if (move.Waiting.Count > 0) return;
        _mmioMoves.Remove(mapped.Id);
        move.Device.Tell(new DeviceProtocol.Completed(move.RequestId));
        if (_startBarrier is { Count: 0 }) StartWhenMmioMoved();
    }

    /// <summary>Device barriers a restored VM waits for before its vcpus run (null: none pending).</summary>
    private HashSet<long>? _startBarrier;

    /// <summary>
    /// A restored device whose range decodes somewhere (a PCI BAR) asks for it while it is built; the
    /// vcpus must have it before the guest runs. So a restored VM first passes a barrier through every
    /// device (<see cref="DeviceProtocol.Sync"/>: answered after everything the device sent before, its
    /// requests included), then waits for those moves, then starts its vcpus.
    /// </summary>
    private void AwaitRestoredDevices()
    {
        _startBarrier = [];
        foreach (var d in _devices)
        {
            var id = ++_lastDrainId;
            _startBarrier.Add(id);
            d.Tell(new DeviceProtocol.Sync(id));
        }
        if (_startBarrier.Count == 0) StartWhenMmioMoved();
    }

    private void StartWhenMmioMoved()
    {
        if (_mmioMoves.Count > 0) return;
        _startBarrier = null;
        StartBootVcpu();
    }

    /// <summary>A vcpu that stopped answers no more moves: they complete without it.</summary>
    private void ForgetVcpu(int index)
    {
        foreach (var (id, move) in _mmioMoves.ToArray())
        {
            if (!move.Waiting.Remove(index) || move.Waiting.Count > 0) continue;
            _mmioMoves.Remove(id);
            move.Device.Tell(new DeviceProtocol.Completed(move.RequestId));
        }
    }

    /// <summary>The snapshot being taken: its taker, who asked, and what the VM does after it.</summary>
    private sealed record SnapshotInProgress(IActorRef Taker, IActorRef Requester, string Directory, bool StopAfter, bool WasPaused);

    private SnapshotInProgress? _snapshot;

    /// <summary>One snapshot at a time, of a VM that runs or is paused (<see cref="SnapshotTaker"/>).</summary>
    private void OnTakeSnapshot(TakeSnapshot request)
    {
        string? refused = _phase is Phase.Running or Phase.Paused ? null : $"the VM is {_phase.ToString().ToLowerInvariant()}";
        if (_snapshot is not null) refused = "a snapshot of it is being taken";
        if (_resources.Spec is null) refused = "it was built without its spec, so it cannot be snapshotted";
        if (string.IsNullOrWhiteSpace(request.Directory)) refused = "no directory given";
        if (refused is not null)
        {
            Sender.Tell(new SnapshotFailed(_resources.Name, request.Directory, refused) { Busy = _snapshot is not null && _phase is Phase.Paused });
            return;
        }
        var sources = new SnapshotTaker.Sources(_resources.Spec!, _vcpus, _resources.KernelApic is null ? _vlapics : [],
            _devices.Where(d => !_gone.Contains(d)).ToList(), _vmspace, _clock, _resources.Kvm);
        var directory = Path.GetFullPath(request.Directory);
        var taker = Context.ActorOf(SnapshotTaker.Props(sources, directory, request.PrecopiedMemory, request.WriteLog), $"snapshot-{++_snapshots}");
        _snapshot = new SnapshotInProgress(taker, Sender, directory, request.StopAfter, _phase == Phase.Paused);
        _phase = Phase.Paused;
    }

    private int _snapshots;

    /// <summary>Why guest memory cannot be copied or tracked now, or null. A snapshot being taken is no
    /// reason: the vmspace does one thing at a time, and each copier has its own write log.</summary>
    private string? MemoryBusy() =>
        _phase is not (Phase.Created or Phase.Running or Phase.Paused) ? $"the VM is {_phase.ToString().ToLowerInvariant()}" : null;

    private void OnSnapshotDone(SnapshotTaker.Done done)
    {
        if (_snapshot is not { } snapshot) return;
        EndSnapshot(new SnapshotTaken(_resources.Name, done.Directory, done.MemoryPages, done.MemoryBytes, done.Paused, done.Total,
            snapshot.StopAfter) { WrittenPages = done.WrittenPages }, snapshot.StopAfter);
        if (snapshot.StopAfter) End(new Outcome(OutcomeKind.Stopped, Outcome.StoppedCode, $"snapshotted to {done.Directory} and stopped"));
    }

    /// <summary>Answers the snapshot's requester; the VM resumes unless it was paused before or stops now.</summary>
    private void EndSnapshot(object answer, bool stop)
    {
        if (_snapshot is not { } snapshot) return;
        _snapshot = null;
        snapshot.Requester.Tell(answer);
        if (stop || _outcome is not null) return;
        if (snapshot.WasPaused) return;
        _phase = Phase.Running;
        foreach (var v in _vcpus) v.Tell(VcpuProtocol.Resume.Instance);
    }

    /// <summary>The first outcome wins; every vcpu is told to stop, then the VM finishes.</summary>
    private void End(Outcome outcome)
    {
        if (_outcome is not null) return;
        if (_snapshot is { } snapshot && !(outcome.Kind == OutcomeKind.Stopped && snapshot.StopAfter))
        {
            // The VM ends while it is being snapshotted: the taker stops and removes what it wrote.
            _snapshot = null;
            Context.Stop(snapshot.Taker);
            snapshot.Requester.Tell(new SnapshotFailed(_resources.Name, snapshot.Directory, $"the VM ended while it was being snapshotted: {outcome.Detail}"));
        }
        _outcome = outcome;
        _phase = Phase.Ending;
        for (var i = 0; i < _vcpus.Count; i++)
            if (!_stopped.Contains(i)) _vcpus[i].Tell(VcpuProtocol.Stop.Instance);
        Timers.StartSingleTimer(EndTimeout.Instance, EndTimeout.Instance, EndGrace);
        TryFinish();
    }

    /// <summary>
    /// Once every vcpu has stopped, the devices drain: each handles what is already in its mailbox
    /// (the guest's last UART bytes, posted before it halted or exited) before the VM ends and its
    /// actors stop. The drain is the devices' barrier: a device answers <see cref="DeviceProtocol.Sync"/>
    /// with <see cref="DeviceProtocol.Completed"/> after all of that (mailbox order).
    /// </summary>
    private void TryFinish()
    {
        if (_outcome is null || _stopped.Count != _vcpus.Count || _draining is not null || _phase == Phase.Ended) return;
        var alive = _devices.Where(d => !_gone.Contains(d)).ToList();
        if (alive.Count == 0)
        {
            Finish();
            return;
        }
        _draining = [];
        foreach (var d in alive)
        {
            var id = ++_lastDrainId;
            _draining[id] = d;
            d.Tell(new DeviceProtocol.Sync(id));
        }
    }

    private long _lastDrainId;

    /// <summary>Forgets the drains of the devices <paramref name="match"/> picks; whether there were any.</summary>
    private bool RemoveDrained(Func<IActorRef, bool> match)
    {
        if (_draining is not { } draining) return false;
        var ids = draining.Where(e => match(e.Value)).Select(e => e.Key).ToArray();
        foreach (var id in ids) draining.Remove(id);
        return ids.Length > 0;
    }

    private readonly HashSet<IActorRef> _gone = [];

    private void Finish()
    {
        if (_phase == Phase.Ended) return;
        _phase = Phase.Ended;
        Timers.CancelAll();
        var ended = new Ended(_resources.Name, _outcome!);
        foreach (var w in _watchers) w.Tell(ended);
        _ended.TrySetResult(_outcome!);
    }
}
