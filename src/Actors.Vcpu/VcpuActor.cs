using Akka.Actor;
using Akka.Event;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu;

/// <summary>
/// One vcpu, as one explicit state machine (<see cref="State"/>; Firecracker's vcpu loop, the
/// seed's vcpu states). Its loop is a self-message: Run → KVM_RUN → handle the exit → Run; every
/// other message is handled between two runs, on the vcpu's pinned thread. Each state's handler
/// returns the next state, and <see cref="MoveTo"/> is the one place the state changes:
/// <code>
///   Created --Start--> Running --HLT--> Halted --interrupt/NMI/INIT--> Running
///   Running --read, waited write, APIC MSR, INTA--> WaitingForReply --reply--> Running
///   Running --a device's write window full--> WaitingForCredit --credit--> Running
///   Running|WaitingForReply --a write that ends the machine--> Ending
///   Created|Running|Halted --INIT (an AP)--> WaitingForSipi --SIPI--> Running
///   Created|Running|Halted|WaitingForSipi --Pause--> Paused --Resume--> (the state before)
///   Created --Start, built with a snapshot--> the snapshot's state (Running, Halted, WaitingForSipi, Created)
///   any --Stop or fatal exit--> Stopped
/// </code>
/// This file holds the states; <c>VcpuActor.RunLoop.cs</c> the run loop (Running) and
/// <c>VcpuActor.Events.cs</c> the vlapic's events. The pure parts live beside it: <see cref="ExitHandler"/> decides what an exit means,
/// <see cref="InterruptInjector"/> what goes in at the next entry, <see cref="DeviceAccess"/> the
/// requests and the reply in flight, <see cref="HaltPolling"/> the halt poll, and
/// <see cref="KernelLapicVcpu"/> what KVM's local APIC (<c>lapic = assisted</c>) needs of a vcpu.
/// </summary>
internal sealed partial class VcpuActor : UntypedActor, IWithUnboundedStash
{
    private sealed class Run : INotTraced
    {
        public static readonly Run Instance = new();
    }

    /// <summary>KVM's local APIC: look whether the guest sleeps in HLT with IF=0 (HLT never exits then).</summary>
    private sealed record ProbeHalt : IVcpuNotify, INotTraced
    {
        public static readonly ProbeHalt Instance = new();
    }

    /// <summary>Exits handled in one turn before the actor yields to its dispatcher (system messages).</summary>
    private const int MaxExitsPerTurn = 256;

    /// <summary>How long a vcpu that sent a read spins for the reply before its thread may sleep.</summary>
    private static readonly long ReplySpinTicks = System.Diagnostics.Stopwatch.Frequency / 50_000; // 20 µs

    private readonly IVcpu _vcpu;
    private readonly Wiring _wiring;
    private readonly ExitStats _stats = new();
    private readonly InterruptInjector _interrupts = new();
    private readonly DeviceAccess _devices;
    private readonly KernelLapicVcpu? _kernelLapic;
    private readonly bool _emulatedLapic;
    private HaltPolling _halt = null!;
    private VcpuMessageQueue _queue = null!; // set in PreStart
    private ITraceSink? _trace;
    private ICancelable? _haltProbe;

    /// <summary>The snapshot to go on from at Start (null: none, or applied already).</summary>
    private VcpuSnapshot? _restore;

    private State _state = State.Created;
    /// <summary>The state a Resume returns to (<see cref="State.Paused"/> only).</summary>
    private State _resumeTo = State.Created;
    /// <summary>A wake-up reached the running vcpu: the guest's next HLT must not sleep through it
    /// (a spurious wake-up from HLT is allowed).</summary>
    private bool _wakePending;
    /// <summary>Where the xAPIC page of an emulated APIC is decoded now (IA32_APIC_BASE); null: nowhere.</summary>
    private ApicPage? _apicPage;

    public IStash Stash { get; set; } = null!;

    /// <summary>The MMIO bus: the wiring's, with the ranges devices moved since (<see cref="MapMmio"/>).</summary>
    private AddressBus<DeviceRoute> _mmio;
    /// <summary>Where each moved range (device actor, window) decodes now.</summary>
    private readonly Dictionary<(IActorRef Actor, ulong Window), ulong> _moved = [];

    public VcpuActor(IVcpu vcpu, Wiring wiring, VcpuSnapshot? restore = null)
    {
        _vcpu = vcpu;
        _wiring = wiring;
        _mmio = wiring.Mmio;
        _restore = restore;
        _emulatedLapic = wiring.Vlapic is not null && !wiring.KernelLapic;
        if (wiring.KernelLapic) _kernelLapic = new KernelLapicVcpu(vcpu);
        var routes = wiring.Ports.Entries.Concat(wiring.Mmio.Entries).Select(e => e.Item3);
        if (wiring.ApicPage is { } page)
        {
            routes = routes.Append(page);
            _apicPage = new ApicPage(LocalApic.DefaultBaseAddress, page);
        }
        _devices = new DeviceAccess(vcpu, Self, _stats, routes);
    }

    private int Id => _vcpu.Id;

    protected override void PreStart()
    {
        try { Thread.CurrentThread.Name = $"vcpu-{Id}"; }
        catch (InvalidOperationException) { /* a pooled thread in unit tests may already be named */ }
        _queue = VcpuQueues.For(Context.System).Of(Self);
        _queue.Vcpu = _vcpu;
        _trace = MessageTraceRegistry.SinkFor(Context.System, Self);
        _halt = new HaltPolling(HaltPollTicks(Context.System.Settings.Config));
    }

    protected override void PostStop()
    {
        _haltProbe?.Cancel();
        if (_queue is not null) _queue.Vcpu = null; // null when PreStart failed
    }

    /// <summary>
    /// The EPT invalidation barrier (the seed's pmap_invalidate_ept), the same in every state: a
    /// vcpu handling a message is out of the guest, and its next entry sees the vmspace's new state,
    /// so it acks at once, after its per-vcpu work: with a dirty ring, it harvests and resets its
    /// ring here, on its own thread, and the GFNs go with the ack. The mailbox kicked it out of
    /// KVM_RUN when the request arrived.
    /// </summary>
    protected override bool AroundReceive(Receive receive, object message)
    {
        if (message is MapMmio map)
        {
            Sender.Tell(new MmioMapped(map.Id, Id, Move(map)));
            return true;
        }
        if (message is not Memory.VmspaceProtocol.InvalidateEpt invalidate) return base.AroundReceive(receive, message);
        var vmspace = Sender;
        var next = TryHarvestDirtyRing(out var harvest); // a vcpu stopped by a failed harvest acks too: it is out of the guest
        vmspace.Tell(new Memory.VmspaceProtocol.EptInvalidated(Id, invalidate.Generation,
            harvest.Gfns.Length > 0 ? harvest.Gfns : null, harvest.RingWasFull));
        MoveTo(next);
        return true;
    }

    /// <summary>
    /// A device's range moves on this vcpu's MMIO bus (taken in every state, like the EPT barrier: the
    /// vcpu is out of the guest while it handles a message, so its next access sees the new bus). The
    /// range's route shares the vcpu's write window to that device. False if the new range overlaps
    /// another device's (or wraps): it is then not decoded.
    /// </summary>
    private bool Move(MapMmio map)
    {
        var key = (map.Actor, map.Window);
        if (_moved.Remove(key, out var old)) _mmio = _mmio.Remove(old);
        if (map.Base is not { } at) return true;
        try
        {
            _mmio = _mmio.Insert(_devices.RouteTo(map.Actor, map.Device).WithWindow(map.Window), at, map.Length);
        }
        catch (BusException)
        {
            return false;
        }
        _moved[key] = at;
        return true;
    }

    protected override void OnReceive(object message) => MoveTo(_state switch
    {
        State.Created => message is Start ? (_restore is { } snapshot ? Restore(snapshot) : Started()) : Common(message),
        State.Running => Running(message),
        State.Halted => Common(message),
        State.WaitingForReply => WaitingForReply(message),
        State.WaitingForCredit => WaitingForCredit(message),
        State.WaitingForSipi => message is Start ? _state : Common(message), // only a SIPI starts an AP
        State.Paused => Paused(message),
        State.Ending => Ending(message),
        _ => Stopped(message),
    });

    /// <summary>
    /// The one place the state changes, and what entering a state does: out of a wait, what was
    /// stashed meanwhile comes back; into Running, the guest runs at once unless messages wait
    /// (they come first), until an exit leads elsewhere.
    /// </summary>
    private void MoveTo(State next)
    {
        while (next != _state)
        {
            var from = _state;
            _state = next;
            if (from is State.WaitingForReply or State.WaitingForCredit || next is State.Ending or State.Stopped) Stash.UnstashAll();
            if (next != State.Running) return;
            if (_halt.Pending && _halt.Woken(System.Diagnostics.Stopwatch.GetTimestamp(), _queue.LastUrgentTicks))
                _wiring.Vm.Tell(new VcpuWoken(Id));
            if (_queue.HasMessages)
            {
                Self.Tell(Run.Instance);
                return;
            }
            next = Step();
        }
    }

    // ---- the states ----

    private State Started()
    {
        _vcpu.BindToCurrentThread();
        if (_kernelLapic is not null)
            _haltProbe = Context.System.Scheduler.ScheduleTellRepeatedlyCancelable(
                KernelLapicVcpu.ProbeInterval, KernelLapicVcpu.ProbeInterval, Self, ProbeHalt.Instance, Self);
        return State.Running; // Created --Start--> Running
    }

    private State Running(object message)
    {
        switch (message)
        {
            case Run:
                return Step();
            case ProbeHalt:
                ProbeKernelHalt();
                return _state;
            default:
                return Common(message);
        }
    }

    private State Paused(object message)
    {
        switch (message)
        {
            case Resume:
                Sender.Tell(new Resumed(Id));
                return _resumeTo; // Paused --Resume--> the state before
            case Pause:
                Sender.Tell(new VcpuProtocol.Paused(Id));
                return _state;
            case SaveState:
                Sender.Tell(Save());
                return _state;
            case Start when _resumeTo == State.Created && _restore is { } snapshot:
                // Paused before its Start: the snapshot goes in now, Resume goes on in its state.
                _resumeTo = Restore(snapshot);
                return _resumeTo == State.Stopped ? State.Stopped : _state;
            default:
                return Common(message);
        }
    }

    /// <summary>The guest ended the machine through a device; the VM is about to stop this vcpu.</summary>
    private State Ending(object message)
    {
        switch (message)
        {
            case Pause:
                Sender.Tell(new VcpuProtocol.Paused(Id)); // out of the guest already
                return _state;
            case Start or Run or ProbeHalt or InjectInterrupt or VlapicProtocol.IVcpuEvent:
                return _state; // no guest code runs any more
            default:
                return Common(message);
        }
    }

    private State Stopped(object message)
    {
        switch (message)
        {
            case GetRegisters or GetStats or VlapicProtocol.ReadKernelLapic:
                return Common(message);
            case Stop:
                Sender.Tell(new VcpuProtocol.Stopped(Id, StopReason.Requested, $"vcpu {Id} already stopped"));
                break;
            case Run or ProbeHalt or DeviceProtocol.WriteCredit or InjectInterrupt or VlapicProtocol.IVcpuEvent:
                break;
            default:
                if (!PendingReply.IsReply(message)) Sender.Tell(new Refused(Id, message.GetType().Name, "vcpu is stopped"));
                break;
        }
        return _state;
    }

    /// <summary>A reply is in flight: only it (and credits, and Stop) are handled; the rest waits in the stash.</summary>
    private State WaitingForReply(object message)
    {
        switch (_devices.Take(message, _interrupts))
        {
            case ReplyProgress.Complete:
                return State.Running; // WaitingForReply --reply--> Running
            case ReplyProgress.MachineEnding:
                return State.Ending; // WaitingForReply --a write that ended the machine--> Ending
            case ReplyProgress.More:
                return _state;
        }
        switch (message)
        {
            case DeviceProtocol.WriteCredit credit:
                _devices.Credit(Sender, credit);
                break;
            case Stop:
                return StopWith(StopReason.Requested, $"vcpu {Id} stopped on request (a reply was in flight)");
            case Run or ProbeHalt:
                break;
            default:
                if (!PendingReply.IsReply(message)) Stash.Stash(); // a stale reply is dropped
                break;
        }
        return _state;
    }

    /// <summary>A device's write window is full: wait for its credit.</summary>
    private State WaitingForCredit(object message)
    {
        switch (message)
        {
            case DeviceProtocol.WriteCredit credit:
                return _devices.Credit(Sender, credit) ? State.Running : _state; // WaitingForCredit --credit--> Running
            case Stop:
                return StopWith(StopReason.Requested, $"vcpu {Id} stopped on request (waiting for device credit)");
            case Run or ProbeHalt:
                return _state;
            default:
                Stash.Stash();
                return _state;
        }
    }

    /// <summary>What every state but the waits answers the same way.</summary>
    private State Common(object message)
    {
        switch (message)
        {
            case Pause:
                _resumeTo = _state;
                Sender.Tell(new VcpuProtocol.Paused(Id));
                return State.Paused; // Created|Running|Halted|WaitingForSipi --Pause--> Paused
            case Resume:
                Sender.Tell(new Resumed(Id));
                break;
            case Stop:
                return StopWith(StopReason.Requested, $"vcpu {Id} stopped on request");
            case GetRegisters:
                Sender.Tell(VcpuRequests.Registers(_vcpu, _state));
                break;
            case SetRegisters set:
                Sender.Tell(VcpuRequests.SetRegisters(_vcpu, set));
                break;
            case GetStats:
                Sender.Tell(_stats.Report(Id, _state, _interrupts.Injected));
                break;
            case SaveState:
                Sender.Tell(new Refused(Id, nameof(SaveState), $"vcpu {Id} is {_state}, not paused: pause it first"));
                break;
            case InjectInterrupt inject:
                _interrupts.Request(inject.Vector);
                return Wake();
            case VlapicProtocol.IVcpuEvent e:
                return OnVlapicEvent(e);
            case DeviceProtocol.WriteCredit credit:
                _devices.Credit(Sender, credit);
                break;
            case FaultProtocol.Crash crash:
                Faults.Crash(crash);
                break;
            case FaultProtocol.Stall stall:
                // The vcpu thread itself stops, as a descheduled host thread would: no guest time,
                // no messages, no EPT acks until it is over. Then the state it was in goes on.
                Context.GetLogger().Warning("vcpu {0} stalled for {1} ms: {2}", Id, stall.Duration.TotalMilliseconds, stall.Reason);
                Faults.StallThread(stall, Context, $"vcpu {Id}");
                break;
            case VlapicProtocol.ReadKernelLapic:
                Sender.Tell(VcpuRequests.ReadKernelLapic(_vcpu)); // forwarded by the vlapic: the reply goes to the asker
                break;
            case VlapicProtocol.WriteKernelLapic write:
                Sender.Tell(VcpuRequests.WriteKernelLapic(_vcpu, write.State));
                break;
            case Start or Run or ProbeHalt:
                break;
            default:
                if (!PendingReply.IsReply(message)) Unhandled(message); // a stale reply is dropped
                break;
        }
        return _state;
    }

    // ---- snapshot and restore ----

    /// <summary>The answer to <see cref="SaveState"/> while paused: KVM's state (its last exit
    /// completed first, see <see cref="VcpuHandle.SaveState"/>) and the user-space state to resume in.</summary>
    private IVcpuMessage Save()
    {
        if (!VcpuSnapshot.IsResumable(_resumeTo))
            return new Refused(Id, nameof(SaveState), $"vcpu {Id} paused in state {_resumeTo}, which cannot be resumed elsewhere");
        try
        {
            return new SavedState(Id, new VcpuSnapshot(Id, _vcpu.SaveState(), _resumeTo, _interrupts.Save(), _wakePending));
        }
        catch (Exception e) when (e is KvmException or InvalidOperationException or NotSupportedException)
        {
            return new Refused(Id, nameof(SaveState), $"vcpu {Id}: {e.Message}");
        }
    }

    /// <summary>
    /// Start of a vcpu built with a snapshot, on its own thread: KVM's state goes in
    /// (<see cref="VcpuHandle.RestoreState"/>), then the user-space state; returns the state the
    /// vcpu goes on in (<see cref="VcpuSnapshot.ResumeIn"/>), after telling the starter
    /// <see cref="Restored"/>. A snapshot KVM refuses stops the vcpu with a report.
    /// </summary>
    private State Restore(VcpuSnapshot snapshot)
    {
        _restore = null;
        KvmSregs sregs;
        try
        {
            snapshot.Validate(Id);
            _vcpu.RestoreState(snapshot.Kvm);
            sregs = snapshot.Kvm.GetSregs();
        }
        catch (Exception e) when (e is ArgumentException or KvmException or NotSupportedException or InvalidOperationException)
        {
            return StopWith(StopReason.RestoreFailed, $"vcpu {Id} stopped: its snapshot could not be restored: {e.Message}");
        }
        _interrupts.Restore(snapshot.Interrupts);
        _wakePending = snapshot.WakePending;
        // Without KVM's APIC, KVM loads kvm_run.cr8 into CR8 at every entry: it must hold the guest's TPR.
        _vcpu.Cr8 = sregs.Cr8 & 0xF;
        if (_wiring.ApicPage is { } page) _apicPage = LocalApic.XApicPage(sregs.ApicBase) is { } at ? new ApicPage(at, page) : null;
        _kernelLapic?.Restored(snapshot.Kvm.MpState);
        var next = snapshot.ResumeIn switch
        {
            State.Running => Started(),
            State.Halted => RestoredHalted(snapshot.Kvm.GetRegs().Rflags),
            _ => snapshot.ResumeIn, // WaitingForSipi: a SIPI starts it; Created: an AP never started
        };
        if (!Sender.IsNobody() && !Sender.Equals(Self)) Sender.Tell(new Restored(Id, snapshot.ResumeIn));
        return next; // Created --Start, a snapshot--> its state
    }

    /// <summary>A vcpu saved in HLT sleeps on, until an interrupt, NMI or INIT, unless one is
    /// pending already; one with IF=0 is reported to the VM again, as its HLT was.</summary>
    private State RestoredHalted(ulong rflags)
    {
        _vcpu.BindToCurrentThread();
        if (_interrupts.AnyPending || _wakePending)
        {
            _wakePending = false;
            return State.Running;
        }
        var reported = (rflags & RflagsIf) == 0;
        _halt.Halted(System.Diagnostics.Stopwatch.GetTimestamp(), reported);
        if (reported) _wiring.Vm.Tell(new VcpuHalted(Id));
        return State.Halted;
    }

    private const ulong RflagsIf = 1UL << 9;

    /// <summary>Reports the stop to the VM (and to whoever asked) and returns <see cref="State.Stopped"/>.</summary>
    private State StopWith(StopReason reason, string report)
    {
        var stopped = new VcpuProtocol.Stopped(Id, reason, report);
        _wiring.Vm.Tell(stopped);
        if (!Sender.IsNobody() && !Sender.Equals(_wiring.Vm) && !Sender.Equals(Self)) Sender.Tell(stopped);
        return State.Stopped; // any --Stop/fatal--> Stopped
    }
}
