using Akka.Actor;
using Akka.Event;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu;

/// <summary>
/// One vcpu. Its loop is a self-message: Run → KVM_RUN → handle the exit → Run. Everything else
/// (pause, interrupts, register requests, device replies) is handled between two runs, on the
/// vcpu's pinned thread. Writes are posted; reads wait for the reply by correlation id and stash
/// what else arrives meanwhile.
///
/// States (the seed's vcpu states, Firecracker's explicit machine):
///   Created --Start--> Running --HLT--> Halted --Notify/Inject/vlapic event--> Running
///   Created|Running|Halted --INIT (an AP)--> WaitingForSipi --SIPI--> Running
///   Running|Halted|Created|WaitingForSipi --Pause--> Paused --Resume--> (previous)
///   Running --a write that ends the machine (debug-exit, reset)--> Ending (no more guest code)
///   any --Stop or fatal exit--> Stopped
/// Running has two waiting sub-states: a reply in flight (device read, APIC MSR, INTA), a
/// device's write window full.
///
/// Interrupts (the seed's vlapic_pending_intr / vlapic_intr_accepted): the vlapic tells
/// <see cref="VlapicProtocol.InterruptPending"/> (a newer vector replaces an older one); before
/// every entry the vcpu injects it with KVM_INTERRUPT if the guest can take it (as of the last
/// exit), tells the vlapic <see cref="VlapicProtocol.InterruptAccepted"/>, and otherwise asks for
/// the interrupt window; it re-checks on every exit (KVM_EXIT_IRQ_WINDOW_OPEN is not seen on
/// every host). At most one KVM_INTERRUPT per entry. ExtINT asks the 8259 for its vector (INTA)
/// when the guest can take it. NMIs go in with KVM_NMI.
/// </summary>
internal sealed class VcpuActor : UntypedActor, IWithUnboundedStash
{
    private sealed class Run : INotTraced
    {
        public static readonly Run Instance = new();
    }

    /// <summary>At most this many NMIs are kept for one entry: one taken, one latched (SDM Vol 3A §6.7.1).</summary>
    private const int MaxNmisPerEntry = 2;

    /// <summary>In-kernel local APIC: look whether the guest sleeps in HLT with IF=0 (HLT never
    /// exits then). Kicks, like every message that needs the vcpu between two runs.</summary>
    private sealed record ProbeHalt : VcpuProtocol.IKicking, INotTraced
    {
        public static readonly ProbeHalt Instance = new();
    }

    /// <summary>How often a vcpu with an in-kernel APIC probes for a halt that ends the VM.</summary>
    private static readonly TimeSpan HaltProbeInterval = TimeSpan.FromMilliseconds(100);

    private readonly IVcpu _vcpu;
    private readonly Wiring _wiring;
    private readonly Dictionary<IActorRef, DeviceRoute> _routesByDevice = new();
    private readonly Queue<byte> _pendingVectors = new();

    // From the vlapic: the vector to inject (newest wins), an NMI, an ExtINT to fetch from the PIC.
    private byte? _lapicVector;
    /// <summary>The newest <see cref="VlapicProtocol.InterruptPending.Seq"/> seen.</summary>
    private long _lapicSeq;
    /// <summary>The trace id of the report that set <see cref="_lapicVector"/>: the causal parent of
    /// its acceptance, which goes out at a later entry (0 when untraced).</summary>
    private long _lapicVectorCause;
    /// <summary>Where the xAPIC page of an emulated APIC is decoded now (IA32_APIC_BASE); null: nowhere.</summary>
    private ApicPage? _apicPage;
    /// <summary>The guest's CR8 (TPR[7:4]) with an emulated local APIC, as of the last exit.</summary>
    private byte _cr8;
    /// <summary>NMIs the vlapic delivered since the last entry. Each becomes one KVM_NMI, and KVM
    /// keeps what the SDM does of them (Vol 3A §6.7.1): with NMIs not blocked, one is injected and
    /// one more held until the handler's IRET; with NMIs blocked, one held; the rest are lost, as
    /// NMIs arriving while one is already latched are on a processor. NMIs that arrive together here
    /// would on a processor have come one after the other, the first taken at once: merging them
    /// into one pending flag would lose the second.</summary>
    private int _nmisPending;
    private bool _extIntPending;
    /// <summary>A KVM_INTERRUPT was issued since the last exit: KVM takes one per entry.</summary>
    private bool _injectionQueued;

    private State _state = State.Created;
    private State _resumeTo = State.Created;

    // The read in flight: its id, the device, and for IN with count > 1 the element index.
    private long _nextReadId;
    private long _readId;
    private DeviceRoute? _readRoute;
    private VmExit? _readExit;
    private bool _intaInFlight;
    private int _readIndex;
    private DeviceRoute? _blockedOn;
    private bool _wakePending;
    // A write the vcpu waits for: the first id of its elements, and whether one ended the machine.
    private long _writeWaitFirst;
    private bool _machineEnding;

    private long _exits, _ioExits, _mmioExits, _hltExits, _intrExits, _unassignedReads, _unassignedWrites, _injected;

    public IStash Stash { get; set; } = null!;

    private Akka.Dispatch.MessageQueues.IMessageQueue _mailbox = null!;
    /// <summary><see cref="_mailbox"/> when it is the vcpu mailbox (peek, wake-up time); null under another.</summary>
    private VcpuMessageQueue? _vcpuQueue;
    private ITraceSink? _trace;

    public VcpuActor(IVcpu vcpu, Wiring wiring)
    {
        _vcpu = vcpu;
        _wiring = wiring;
        _created = Handling(Created);
        _paused = Handling(Paused);
        _running = Handling(Running);
        _halted = Handling(Halted);
        _waitingForSipi = Handling(WaitingForSipi);
        _waitingForRead = Handling(WaitingForRead);
        _waitingForCredit = Handling(WaitingForCredit);
        _ending = Handling(Ending);
        _stopped = Handling(Stopped);
        foreach (var (_, _, route) in wiring.Ports.Entries) _routesByDevice[route.Device] = route;
        foreach (var (_, _, route) in wiring.Mmio.Entries) _routesByDevice[route.Device] = route;
        if (wiring.ApicPage is { } page)
        {
            _routesByDevice[page.Device] = page;
            _apicPage = new ApicPage(LocalApic.DefaultBaseAddress, page);
        }
        Switch(_created);
    }

    // The behaviours as delegates made once: Become with a method group would allocate two
    // delegates per state change, several times per exit.
    private readonly Receive _created, _paused, _running, _halted, _waitingForSipi, _waitingForRead, _waitingForCredit, _ending, _stopped;
    private Receive? _behaviour;

    /// <summary>Handles the next messages with <paramref name="behaviour"/> (nothing to do if it already does).</summary>
    private void Switch(Receive behaviour)
    {
        if (ReferenceEquals(_behaviour, behaviour)) return;
        _behaviour = behaviour;
        Context.Become(behaviour);
    }

    private static Receive Handling(Action<object> handler) => message =>
    {
        handler(message);
        return true;
    };

    private int Id => _vcpu.Id;

    protected override void PreStart()
    {
        try { Thread.CurrentThread.Name = $"vcpu-{Id}"; }
        catch (InvalidOperationException) { /* a pooled thread in unit tests may already be named */ }
        VcpuKickRegistry.Register(Self, _vcpu);
        _mailbox = ((ActorCell)Context).Mailbox.MessageQueue;
        _vcpuQueue = _mailbox as VcpuMessageQueue;
        _trace = MessageTraceRegistry.SinkFor(Context.System, Self);
    }

    protected override void PostStop()
    {
        _haltProbe?.Cancel();
        VcpuKickRegistry.Unregister(Self);
    }

    private ICancelable? _haltProbe;
    /// <summary>In-kernel APIC: this AP has left wait-for-SIPI (KVM's MP state says so).</summary>
    private bool _kernelStarted;
    /// <summary>In-kernel APIC: the current halt with IF=0 was reported to the VM.</summary>
    private bool _kernelHaltReported;

    protected override void OnReceive(object message) => Unhandled(message);

    /// <summary>
    /// The EPT invalidation barrier (the seed's pmap_invalidate_ept), the same in every state: a
    /// vcpu handling a message is out of the guest, and its next entry sees the vmspace's new
    /// state, so it acks at once, after its per-vcpu work: with a dirty ring, it harvests and
    /// resets its ring here, on its own thread, and the GFNs go with the ack.
    /// The mailbox kicked it out of KVM_RUN when the request arrived.
    /// </summary>
    protected override bool AroundReceive(Receive receive, object message)
    {
        if (message is Memory.VmspaceProtocol.InvalidateEpt invalidate)
        {
            _eptGeneration = Math.Max(_eptGeneration, invalidate.Generation);
            var vmspace = Sender;
            TryHarvestDirtyRing(out var harvest); // even a vcpu stopped by a failed harvest acks: it is out of the guest
            vmspace.Tell(new Memory.VmspaceProtocol.EptInvalidated(Id, invalidate.Generation,
                harvest.Gfns.Length > 0 ? harvest.Gfns : null, harvest.RingWasFull));
            return true;
        }
        return base.AroundReceive(receive, message);
    }

    /// <summary>Harvests this vcpu's dirty ring (empty without one). A failed harvest stops the vcpu:
    /// its ring can no longer be trusted, and a full ring would keep it out of the guest.</summary>
    private bool TryHarvestDirtyRing(out DirtyRingHarvest harvest)
    {
        try
        {
            harvest = _vcpu.HarvestDirtyRing();
            return true;
        }
        catch (KvmException e)
        {
            harvest = DirtyRingHarvest.Empty;
            StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: harvesting its dirty ring failed: {e.Message}");
            return false;
        }
    }

    private ulong _eptGeneration;

    // ---- states ----

    private void Created(object message)
    {
        switch (message)
        {
            case Start:
                _vcpu.BindToCurrentThread();
                if (_wiring.KernelLapic)
                {
                    // KVM keeps the MP state: an AP's KVM_RUN sleeps in the kernel until its SIPI.
                    _kernelStarted = Id == 0;
                    _haltProbe = Context.System.Scheduler.ScheduleTellRepeatedlyCancelable(
                        HaltProbeInterval, HaltProbeInterval, Self, ProbeHalt.Instance, Self);
                }
                // Created --Start--> Running
                EnterRunning();
                break;
            default:
                Common(message);
                break;
        }
    }

    /// <summary>An AP after INIT: nothing runs until a SIPI (SDM Vol 3A §8.4.1, "wait-for-SIPI").</summary>
    private void WaitingForSipi(object message)
    {
        switch (message)
        {
            case Start:
                break; // only a SIPI starts an AP
            default:
                Common(message);
                break;
        }
    }

    private void Running(object message)
    {
        switch (message)
        {
            case Run:
                Step();
                break;
            case ProbeHalt:
                ProbeKernelHalt();
                break;
            case Notify:
                // Running: the event may race with a HLT the guest is executing now; remember it
                // so that HLT does not sleep through it (a spurious wake-up from HLT is allowed).
                _wakePending = true;
                break;
            default:
                Common(message);
                break;
        }
    }

    private void Halted(object message)
    {
        switch (message)
        {
            case Notify:
                // Halted --Notify--> Running
                EnterRunning();
                break;
            case InjectInterrupt inject:
                _pendingVectors.Enqueue(inject.Vector);
                // Halted --InjectInterrupt--> Running
                EnterRunning();
                break;
            default:
                Common(message);
                break;
        }
    }

    private void Paused(object message)
    {
        switch (message)
        {
            case Resume:
                // Paused --Resume--> previous state
                Sender.Tell(new Resumed(Id));
                if (_resumeTo == State.Running) EnterRunning();
                else if (_resumeTo == State.Halted) EnterHalted();
                else if (_resumeTo == State.WaitingForSipi) EnterWaitingForSipi();
                else { _state = State.Created; Switch(_created); }
                break;
            case Notify:
                if (_resumeTo == State.Halted) _resumeTo = State.Running;
                break;
            case InjectInterrupt inject:
                _pendingVectors.Enqueue(inject.Vector);
                if (_resumeTo == State.Halted) _resumeTo = State.Running;
                break;
            case Pause:
                Sender.Tell(new VcpuProtocol.Paused(Id));
                break;
            default:
                Common(message);
                break;
        }
    }

    /// <summary>The guest ended the machine through a device; the VM is about to stop this vcpu.</summary>
    private void Ending(object message)
    {
        switch (message)
        {
            case Pause:
                Sender.Tell(new VcpuProtocol.Paused(Id)); // out of the guest already
                break;
            case Resume:
                Sender.Tell(new Resumed(Id));
                break;
            case Start or Run or ProbeHalt or Notify or InjectInterrupt or VlapicProtocol.IVcpuEvent:
                break; // no guest code runs any more
            default:
                Common(message);
                break;
        }
    }

    private void Stopped(object message)
    {
        switch (message)
        {
            case GetRegisters:
                ReplyRegisters();
                break;
            case GetStats:
                ReplyStats();
                break;
            case VlapicProtocol.ReadKernelLapic:
                ReplyKernelLapic();
                break;
            case Run or ProbeHalt or DeviceProtocol.ReadResult or DeviceProtocol.WriteCredit or Notify or InjectInterrupt
                or VlapicProtocol.IVcpuEvent or VlapicProtocol.MsrReadResult or VlapicProtocol.MsrWriteResult
                or DeviceProtocol.Acknowledged or DeviceProtocol.WriteDone:
                break;
            case Stop:
                Sender.Tell(new VcpuProtocol.Stopped(Id, StopReason.Requested, $"vcpu {Id} already stopped"));
                break;
            default:
                Sender.Tell(new Refused(Id, message.GetType().Name, "vcpu is stopped"));
                break;
        }
    }

    /// <summary>A read is in flight: only its reply (and credits, and Stop) are handled.</summary>
    private void WaitingForRead(object message)
    {
        switch (TakeReply(message))
        {
            case Replies.Complete:
                EndWait();
                return;
            case Replies.MachineEnding:
                Stash.UnstashAll();
                EnterEnding();
                return;
            case Replies.More:
                return;
        }
        switch (message)
        {
            case DeviceProtocol.Acknowledged a when a.Id == _readId && _intaInFlight:
                _intaInFlight = false;
                if (a.Vector is { } vector) InjectNow((byte)vector);
                // INTR is a level: it stays pending while the PIC still requests (and gave a vector).
                _extIntPending = a.StillRequested && a.Vector is not null;
                EndWait();
                break;
            case DeviceProtocol.ReadResult or DeviceProtocol.WriteDone or VlapicProtocol.MsrReadResult or VlapicProtocol.MsrWriteResult
                or DeviceProtocol.Acknowledged:
                break; // stale
            case DeviceProtocol.WriteCredit credit:
                ApplyCredit(credit);
                break;
            case Stop:
                StopWith(StopReason.Requested, $"vcpu {Id} stopped on request (a read was in flight)");
                break;
            case Run or ProbeHalt:
                break;
            default:
                Stash.Stash();
                break;
        }
    }

    /// <summary>The write window to <see cref="_blockedOn"/> is full: wait for credit.</summary>
    private void WaitingForCredit(object message)
    {
        switch (message)
        {
            case DeviceProtocol.WriteCredit credit:
                ApplyCredit(credit);
                if (_blockedOn is null || _blockedOn.InFlight < DeviceProtocol.WriteWindow)
                {
                    _blockedOn = null;
                    Stash.UnstashAll();
                    EnterRunning();
                }
                break;
            case Stop:
                StopWith(StopReason.Requested, $"vcpu {Id} stopped on request (waiting for device credit)");
                break;
            case Run or ProbeHalt:
                break;
            default:
                Stash.Stash();
                break;
        }
    }

    /// <summary>Requests every state but Stopped answers the same way.</summary>
    private void Common(object message)
    {
        switch (message)
        {
            case Pause:
                // Running|Halted|Created --Pause--> Paused
                _resumeTo = _state;
                _state = State.Paused;
                Switch(_paused);
                Sender.Tell(new VcpuProtocol.Paused(Id));
                break;
            case Resume:
                Sender.Tell(new Resumed(Id));
                break;
            case Stop:
                StopWith(StopReason.Requested, $"vcpu {Id} stopped on request");
                break;
            case GetRegisters:
                ReplyRegisters();
                break;
            case SetRegisters set:
                try
                {
                    if (set.Registers is { } r) _vcpu.SetRegisters(r.ToKvm());
                    if (set.Special is { } s) _vcpu.SetSpecialRegisters(s.ApplyTo(_vcpu.GetSpecialRegisters()));
                    Sender.Tell(new RegistersSet(Id));
                }
                catch (KvmException e)
                {
                    Sender.Tell(new Refused(Id, nameof(SetRegisters), e.Message));
                }
                break;
            case InjectInterrupt inject:
                _pendingVectors.Enqueue(inject.Vector);
                break;
            case VlapicProtocol.IVcpuEvent e:
                OnVlapicEvent(e);
                break;
            case GetStats:
                ReplyStats();
                break;
            case DeviceProtocol.WriteCredit credit:
                ApplyCredit(credit);
                break;
            case FaultProtocol.Crash crash:
                throw new InjectedFaultException(crash.Reason);
            case FaultProtocol.Stall stall:
                // The vcpu thread itself stops, as a descheduled host thread would: no guest time,
                // no messages, no EPT acks until it is over. Then the state it was in goes on.
                Context.GetLogger().Warning("vcpu {0} stalled for {1} ms: {2}", Id, stall.Duration.TotalMilliseconds, stall.Reason);
                var slept = FaultProtocol.StallHere(stall, Context);
                Sender.Tell(new FaultProtocol.Injected($"vcpu {Id} stalled for {slept.TotalMilliseconds:0} ms"));
                break;
            case VlapicProtocol.ReadKernelLapic:
                ReplyKernelLapic();
                break;
            case VlapicProtocol.WriteKernelLapic write:
                WriteKernelLapic(write.State);
                break;
            case Start or Notify or Run or ProbeHalt or DeviceProtocol.ReadResult or VlapicProtocol.MsrReadResult
                or VlapicProtocol.MsrWriteResult or DeviceProtocol.Acknowledged or DeviceProtocol.WriteDone:
                break;
            default:
                Unhandled(message);
                break;
        }
    }

    // ---- the run loop ----

    private void EnterRunning()
    {
        if (_haltedAt != 0) AdaptHaltPoll();
        if (_haltReported)
        {
            _haltReported = false;
            _wiring.Vm.Tell(new VcpuWoken(Id));
        }
        _state = State.Running;
        Switch(_running);
        // With nothing else waiting, run the guest now rather than through a Run message (a wake-up
        // or an answer from the vlapic costs one mailbox turn less); otherwise what came first is
        // handled first.
        if (_mailbox.HasMessages) Self.Tell(Run.Instance);
        else Step();
    }

    private void EnterHalted()
    {
        _state = State.Halted;
        Switch(_halted);
    }

    private void EnterWaitingForSipi()
    {
        _state = State.WaitingForSipi;
        Switch(_waitingForSipi);
    }

    // ---- the vlapic's events (vcpu_notify_event) ----

    private void OnVlapicEvent(VlapicProtocol.IVcpuEvent e)
    {
        switch (e)
        {
            case VlapicProtocol.InterruptPending p:
                if (p.Seq != 0 && p.Seq <= _lapicSeq) break; // a duplicate, or older than what came since
                if (p.Seq != 0) _lapicSeq = p.Seq;
                _lapicVector = p.Vector;
                if (_trace is not null) _lapicVectorCause = TraceContext.Save().Current;
                Wake();
                break;
            case VlapicProtocol.TaskPriorityChanged t:
                _cr8 = (byte)(t.Tpr >> 4);
                _vcpu.Cr8 = _cr8; // KVM loads it into CR8 at the next entry
                break;
            case VlapicProtocol.NoInterruptPending n:
                if (n.Seq <= _lapicSeq) break;
                _lapicSeq = n.Seq;
                _lapicVector = null; // not injected yet: the guest does not get it
                break;
            case VlapicProtocol.ApicBaseChanged b:
                OnApicBaseChanged(b.ApicBase);
                break;
            case VlapicProtocol.NmiPending:
                _nmisPending = Math.Min(_nmisPending + 1, MaxNmisPerEntry);
                Wake();
                break;
            case VlapicProtocol.ExtIntPending:
                if (_wiring.Pic is null) break; // no 8259 to ask for the vector
                _extIntPending = true;
                Wake();
                break;
            case VlapicProtocol.InitReceived:
                OnInit();
                break;
            case VlapicProtocol.StartupReceived s:
                OnStartup(s.Vector);
                break;
            default:
                break; // SMI: no SMM in this VMM
        }
    }

    /// <summary>
    /// IA32_APIC_BASE changed in the vlapic: the xAPIC page moves where the base names it, or is
    /// decoded nowhere outside xAPIC mode (SDM Vol 3A §10.4.4-10.4.5); and KVM is told the value
    /// (KVM_SET_MSRS, host-initiated: KVM never sees the guest's WRMSR, which exits to the vlapic),
    /// so that the CPUID.01H:EDX.APIC bit it reports follows IA32_APIC_BASE.EN (§10.4.3).
    /// </summary>
    private void OnApicBaseChanged(ulong apicBase)
    {
        if (_wiring.ApicPage is { } page)
            _apicPage = LocalApic.XApicPage(apicBase) is { } at ? new ApicPage(at, page) : null;
        try
        {
            _vcpu.SetMsrs(new KvmMsrEntry { Index = ApicMsrs.ApicBase, Data = apicBase });
        }
        catch (Exception e) when (e is KvmException or NotSupportedException)
        {
            Context.GetLogger().Warning("vcpu {0}: KVM did not take IA32_APIC_BASE 0x{1:X} ({2}); CPUID.01H:EDX.APIC may not follow it",
                Id, apicBase, e.Message);
        }
    }

    /// <summary>An event that makes a halted vcpu run (a spurious wake-up from HLT is allowed).</summary>
    private void Wake()
    {
        switch (_state)
        {
            case State.Halted:
                // Halted --interrupt/NMI--> Running
                EnterRunning();
                break;
            case State.Paused when _resumeTo == State.Halted:
                _resumeTo = State.Running;
                break;
            case State.Running:
                _wakePending = true;
                break;
        }
    }

    /// <summary>
    /// INIT (SDM Vol 3A §8.4, Table 9-1): registers to the INIT state, pending interrupts dropped
    /// (the vlapic has reset itself). An AP then waits for a SIPI; the BSP runs on from the reset
    /// vector (KVM does the same: it has no firmware to return to either).
    /// </summary>
    private void OnInit()
    {
        _lapicVector = null;
        _nmisPending = 0;
        _extIntPending = false;
        _pendingVectors.Clear();
        _wakePending = false;
        SetInitRegisters();
        if (Id == 0)
        {
            if (_state == State.Halted) EnterRunning(); // Halted --INIT (BSP)--> Running at F000:FFF0
            else if (_state == State.Paused && _resumeTo == State.Halted) _resumeTo = State.Running;
            return;
        }
        if (_state == State.Paused) _resumeTo = State.WaitingForSipi;
        else EnterWaitingForSipi(); // Created|Running|Halted --INIT--> WaitingForSipi
    }

    /// <summary>SIPI: only an AP waiting for it starts, at CS = vector &lt;&lt; 8 (base vector &lt;&lt; 12), IP = 0, real mode.</summary>
    private void OnStartup(byte vector)
    {
        var waiting = _state == State.WaitingForSipi || (_state == State.Paused && _resumeTo == State.WaitingForSipi);
        if (!waiting) return; // SDM §8.4.4.1: a SIPI outside wait-for-SIPI is ignored
        try
        {
            ProcessorInit.ApplyStartup(_vcpu, vector);
        }
        catch (KvmException e)
        {
            StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: could not start at SIPI vector 0x{vector:X2}: {e.Message}");
            return;
        }
        _wiring.Vm.Tell(new StartedBySipi(Id, vector));
        if (_state == State.Paused)
        {
            _resumeTo = State.Running;
            return;
        }
        _vcpu.BindToCurrentThread();
        // WaitingForSipi --SIPI--> Running
        EnterRunning();
    }

    /// <summary>INIT's register state (<see cref="ProcessorInit.ApplyInit"/>).</summary>
    private void SetInitRegisters()
    {
        try
        {
            ProcessorInit.ApplyInit(_vcpu);
        }
        catch (KvmException e)
        {
            StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: could not apply INIT: {e.Message}");
        }
    }

    /// <summary>Exits handled in one turn before the actor yields to its dispatcher (system messages).</summary>
    private const int MaxExitsPerTurn = 256;

    /// <summary>
    /// Runs the guest until an exit needs a reply or a state change, or a message is waiting.
    /// While the mailbox is empty the vcpu re-enters at once instead of telling itself Run: a
    /// message that needs the vcpu kicks it, so it is seen before the next entry either way.
    /// </summary>
    private void Step()
    {
        for (var i = 0; i < MaxExitsPerTurn; i++)
        {
            if (!RunOnce()) return;
            if (_mailbox.HasMessages) break;
        }
        Self.Tell(Run.Instance);
    }

    /// <summary>One KVM_RUN and its exit. True when the vcpu should simply run again.</summary>
    private bool RunOnce()
    {
        if (!PrepareEntry()) return false;
        // From the announcement on, a kick signals this thread; before it, a kick only sets
        // immediate_exit, so look for messages after it. This also catches an actor that runs on
        // this thread (the vlapic, on InterruptAccepted) and answered already: a kick from this
        // thread is no kick. What was injected stays queued in KVM for the next entry.
        _vcpu.PrepareToRun();
        if (_mailbox.HasMessages)
        {
            _vcpu.CancelRun();
            return true;
        }
        VmExit exit;
        try
        {
            _exitStats.Entering();
            exit = _vcpu.Run();
            _exitStats.Exited(exit);
            _injectionQueued = false;
        }
        catch (Exception e)
        {
            StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: KVM_RUN failed: {e.Message}");
            return false;
        }
        _exits++;
        if (_wiring.Vlapic is not null && !_wiring.KernelLapic) SyncCr8();
        if (_trace is not null) TraceExit(exit);
        if (!_kernelStarted && _wiring.KernelLapic) NoteKernelStart();
        var action = ExitHandler.Decide(exit, _wiring.Ports, _wiring.Mmio, apicMsrs: _wiring.Vlapic is not null && !_wiring.KernelLapic,
            _apicPage);
        switch (action.Kind)
        {
            case ExitActionKind.Reenter:
                if (exit is VmExit.Intr) _intrExits++;
                return true;
            case ExitActionKind.PostWrite:
                return PostWrites(exit, action);
            case ExitActionKind.WriteAndWait:
                WriteAndWait(exit, action);
                switch (TakeRepliesInLine())
                {
                    case Replies.Complete:
                        return true;
                    case Replies.MachineEnding:
                        EnterEnding();
                        return false;
                }
                Switch(_waitingForRead);
                SpinForReply();
                return false;
            case ExitActionKind.Read:
                CountAccess(exit);
                _readRoute = action.Route;
                _readExit = exit;
                _readIndex = 0;
                SendRead(action.Offset, action.Size);
                if (TakeRepliesInLine() == Replies.Complete) return true;
                Switch(_waitingForRead);
                SpinForReply();
                return false;
            case ExitActionKind.UnassignedRead:
                CountAccess(exit);
                _unassignedReads++;
                CompleteUnassignedRead(exit, action.Size);
                return true;
            case ExitActionKind.UnassignedWrite:
                CountAccess(exit);
                _unassignedWrites++;
                return true;
            case ExitActionKind.Halt:
                _hltExits++;
                return OnHalt();
            case ExitActionKind.ApicMsr:
                // Synchronous like a device read: a refused access is a #GP.
                _readId = ++_nextReadId;
                _readExit = exit;
                _readRoute = null;
                _wiring.Vlapic!.Tell(exit is VmExit.MsrRead r
                    ? new VlapicProtocol.MsrRead(_readId, r.Index)
                    : new VlapicProtocol.MsrWrite(_readId, ((VmExit.MsrWrite)exit).Index, ((VmExit.MsrWrite)exit).Value), Self);
                if (TakeRepliesInLine() == Replies.Complete) return true;
                Switch(_waitingForRead);
                SpinForReply();
                return false;
            case ExitActionKind.IoapicEoi:
                // The kernel APIC retired a level-triggered vector: the IOAPIC clears Remote IRR.
                _wiring.Vlapic?.Tell(new VlapicProtocol.EndOfInterrupt(((VmExit.IoapicEoi)exit).Vector), Self);
                return true;
            case ExitActionKind.HarvestDirtyRing:
                // KVM runs the vcpu again only once its full ring is harvested and reset.
                if (!TryHarvestDirtyRing(out var harvest)) return false;
                _wiring.Vmspace?.Tell(new Memory.VmspaceProtocol.DirtyRingHarvested(Id, harvest.Gfns, harvest.RingWasFull), Self);
                return true;
            case ExitActionKind.MsrFault:
                if (exit is VmExit.MsrRead) _vcpu.CompleteMsrRead(0, fault: true);
                else _vcpu.CompleteMsrWrite(fault: true);
                return true;
            default:
                StopWith(action.StopReason, FailureReport.Build(Id, action.StopReason, exit, _vcpu, _wiring.Memory));
                return false;
        }
    }

    /// <summary>Records the exit as a trace event and makes it the causal parent of what follows.</summary>
    private void TraceExit(VmExit exit)
    {
        var e = exit switch
        {
            VmExit.Io io => new GuestExit(Id, io.IsOut ? "io-out" : "io-in", io.Port, io.Size, io.IsOut, io.Value),
            VmExit.Mmio m => new GuestExit(Id, m.IsWrite ? "mmio-write" : "mmio-read", m.Address, m.Length, m.IsWrite, m.Value),
            _ => new GuestExit(Id, exit.GetType().Name.ToLowerInvariant(), 0, 0, false, 0),
        };
        var id = TraceContext.Record(_trace!, Self, Self, e);
        TraceContext.Enter(Self, id);
    }

    private void CountAccess(VmExit exit)
    {
        if (exit is VmExit.Io) _ioExits++;
        else _mmioExits++;
    }

    /// <summary>Posts the write(s); false when the device's write window is full (the vcpu waits).</summary>
    private bool PostWrites(VmExit exit, ExitAction action)
    {
        var route = action.Route!;
        var device = route.Device;
        if (exit is VmExit.Io { Count: > 1, Data: { } data } io)
        {
            _ioExits++;
            for (var i = 0; i < io.Count; i++)
            {
                var value = LittleEndian(data.AsSpan(i * io.Size, io.Size));
                device.Tell(new DeviceProtocol.Write(action.Offset, io.Size, value), Self);
            }
            route.InFlight += (int)io.Count;
        }
        else
        {
            CountAccess(exit);
            var value = exit is VmExit.Io one ? one.Value : ((VmExit.Mmio)exit).Value;
            device.Tell(new DeviceProtocol.Write(action.Offset, action.Size, value), Self);
            route.InFlight++;
        }
        if (route.InFlight >= DeviceProtocol.WriteWindow)
        {
            // Running --window full--> waiting for credit (a flooding guest waits here).
            _blockedOn = route;
            Switch(_waitingForCredit);
            return false;
        }
        return true;
    }

    /// <summary>Writes to a device whose writes can end the machine, one <see cref="DeviceProtocol.WriteAndWait"/>
    /// per element (a string OUT has several), and waits for the last <see cref="DeviceProtocol.WriteDone"/>.</summary>
    private void WriteAndWait(VmExit exit, ExitAction action)
    {
        var route = action.Route!;
        _readRoute = route;
        _readExit = exit;
        _writeWaitFirst = _nextReadId + 1;
        _machineEnding = false;
        if (exit is VmExit.Io { Count: > 1, Data: { } data } io)
        {
            _ioExits++;
            for (var i = 0; i < io.Count; i++)
            {
                _readId = ++_nextReadId;
                route.Device.Tell(new DeviceProtocol.WriteAndWait(_readId, action.Offset, io.Size, LittleEndian(data.AsSpan(i * io.Size, io.Size))), Self);
            }
        }
        else
        {
            CountAccess(exit);
            var value = exit is VmExit.Io one ? one.Value : ((VmExit.Mmio)exit).Value;
            _readId = ++_nextReadId;
            route.Device.Tell(new DeviceProtocol.WriteAndWait(_readId, action.Offset, action.Size, value), Self);
        }
    }

    private enum WriteWait : byte { Pending, Done, MachineEnding }

    /// <summary>One <see cref="DeviceProtocol.WriteDone"/> of the write the vcpu waits for: done with
    /// the last element, and whether any element ended the machine.</summary>
    private WriteWait ApplyWriteDone(DeviceProtocol.WriteDone done)
    {
        if (done.MachineEnding) _machineEnding = true;
        if (done.Id != _readId) return WriteWait.Pending; // more elements of a string OUT to come
        _readRoute!.InFlight = 0; // the reply acknowledges every earlier write (FIFO)
        _readExit = null;
        _readRoute = null;
        return _machineEnding ? WriteWait.MachineEnding : WriteWait.Done;
    }

    /// <summary>Running --machine-ending write--> Ending: no further guest instruction runs here.</summary>
    private void EnterEnding()
    {
        _state = State.Ending;
        Switch(_ending);
    }

    /// <summary>How long a vcpu that sent a read spins for the reply before its thread may sleep.</summary>
    private static readonly long ReplySpinTicks = System.Diagnostics.Stopwatch.Frequency / 50_000; // 20 µs

    /// <summary>What a message did to the reply the vcpu waits for: nothing (not its reply), one
    /// element of several in (the next one asked for), the whole of it, or the whole of a write that
    /// ended the machine.</summary>
    private enum Replies : byte { None, More, Complete, MachineEnding }

    /// <summary>
    /// Takes <paramref name="message"/> in if it answers the read, waited write or APIC MSR access in
    /// flight: completes the exit in kvm_run (or asks for the next element of a string IN).
    /// </summary>
    private Replies TakeReply(object message)
    {
        switch (message)
        {
            case DeviceProtocol.ReadResult r when r.Id == _readId && _readExit is VmExit.Io or VmExit.Mmio:
                if (!ApplyRead(r.Value)) return Replies.More;
                _readExit = null;
                _readRoute = null;
                return Replies.Complete;
            case DeviceProtocol.WriteDone w when w.Id >= _writeWaitFirst && w.Id <= _readId && _readRoute is not null:
                return ApplyWriteDone(w) switch
                {
                    WriteWait.Done => Replies.Complete,
                    WriteWait.MachineEnding => Replies.MachineEnding,
                    _ => Replies.More,
                };
            case VlapicProtocol.MsrReadResult r when r.Id == _readId && _readExit is VmExit.MsrRead:
                _vcpu.CompleteMsrRead(r.Value, fault: !r.Ok);
                _readExit = null;
                return Replies.Complete;
            case VlapicProtocol.MsrWriteResult w when w.Id == _readId && _readExit is VmExit.MsrWrite:
                _vcpu.CompleteMsrWrite(fault: !w.Ok);
                _readExit = null;
                return Replies.Complete;
            default:
                return Replies.None;
        }
    }

    /// <summary>
    /// Devices and vlapics run on the thread that sends to them when they are idle (InlineDispatcher,
    /// as bhyve handles a vcpu's port, MMIO and APIC accesses in the vcpu's context), so the answer to
    /// a read, an APIC MSR access or a write the vcpu waits for is usually in the mailbox before Tell
    /// returns. Taken at once while first in line (the next element of a string IN is asked for and
    /// taken the same way), it spares the vcpu a turn of its mailbox and a Run message: the guest
    /// goes on in this same Step. With anything else first in line, or no answer yet (the device was
    /// busy on another thread), the vcpu waits for it in <see cref="WaitingForRead"/> (None).
    /// Only this thread takes from the mailbox, so the message peeked at is still first once taken in.
    /// </summary>
    private Replies TakeRepliesInLine()
    {
        if (_vcpuQueue is not { } queue) return Replies.None;
        while (queue.TryPeek(out var first))
        {
            var taken = TakeReply(first);
            if (taken == Replies.None) return Replies.None;
            queue.TryDequeue(out _);
            if (taken != Replies.More) return taken;
        }
        return Replies.None;
    }

    /// <summary>
    /// A device usually answers a read within microseconds: spinning that long keeps the vcpu thread
    /// awake, so the dispatcher hands it the reply at once instead of waking it from a sleep (which
    /// costs more than the read). Returns as soon as any message is in the mailbox.
    /// </summary>
    private void SpinForReply() => SpinUntilMessage(System.Diagnostics.Stopwatch.GetTimestamp() + ReplySpinTicks);

    /// <summary>
    /// Looks at the mailbox until a message is in or <paramref name="until"/> (Stopwatch ticks) has
    /// passed. Every other turn offers the core to another thread (sched_yield returns at once when
    /// none wants it, as KVM stops polling when its CPU has other work): on a host with few cores
    /// the thread that will send the message (a device on the pool, the other vcpu) may be waiting
    /// for this one's core. On two cores, spinning without it made a round trip through pool
    /// actors five times slower.
    /// </summary>
    private void SpinUntilMessage(long until)
    {
        for (var turn = 0; !_mailbox.HasMessages && System.Diagnostics.Stopwatch.GetTimestamp() < until; turn++)
        {
            if ((turn & 1) == 0) Thread.SpinWait(20);
            else Thread.Yield();
        }
    }

    private void SendRead(ulong offset, int size)
    {
        _readId = ++_nextReadId;
        _readRoute!.Device.Tell(new DeviceProtocol.Read(_readId, offset, size), Self);
    }

    /// <summary>One element of the read in flight is in: true when it was the last (the exit is
    /// complete); false when the next element's read was sent (a string IN).</summary>
    private bool ApplyRead(ulong value)
    {
        var route = _readRoute!;
        route.InFlight = 0; // the reply acknowledges every earlier write (FIFO)
        switch (_readExit)
        {
            case VmExit.Io io:
                _vcpu.CompleteIoIn(_readIndex, value);
                if (++_readIndex < io.Count)
                {
                    _wiring.Ports.TryResolve(io.Port, out var again, out var offset);
                    SendRead(again.Window + offset, io.Size);
                    return false;
                }
                break;
            case VmExit.Mmio:
                _vcpu.CompleteMmioRead(value);
                break;
        }
        return true;
    }

    /// <summary>The reply the vcpu waited for is in: back to running, with what arrived meanwhile.</summary>
    private void EndWait()
    {
        _readExit = null;
        _readRoute = null;
        Stash.UnstashAll();
        EnterRunning();
    }

    private void CompleteUnassignedRead(VmExit exit, int size)
    {
        var ones = ExitHandler.AllOnes(size);
        if (exit is VmExit.Io io)
            for (var i = 0; i < io.Count; i++) _vcpu.CompleteIoIn(i, ones);
        else
            _vcpu.CompleteMmioRead(ones);
    }

    private void ApplyCredit(DeviceProtocol.WriteCredit credit)
    {
        if (_routesByDevice.TryGetValue(Sender, out var route))
            route.InFlight = Math.Max(0, route.InFlight - credit.Count);
    }

    /// <summary>True when the vcpu should run on (an event is pending); false when it halts.</summary>
    private bool OnHalt()
    {
        if (_pendingVectors.Count > 0 || _wakePending || _lapicVector is not null || _nmisPending > 0 || _extIntPending)
        {
            _wakePending = false;
            return true;
        }
        // Running --HLT--> Halted. With IF=0 and nothing pending, only an NMI/INIT could wake
        // it: the VM decides whether that ends its run. A halt with IF=1 is none of the VM's
        // business (an idle guest waiting for its next interrupt): no message for it, which on a
        // busy guest would wake a pool thread on every HLT.
        EnterHalted();
        _haltedAt = System.Diagnostics.Stopwatch.GetTimestamp();
        if (!_vcpu.InterruptsEnabled)
        {
            _haltReported = true;
            _wiring.Vm.Tell(new VcpuHalted(Id));
            return false; // with IF=0 no interrupt wakes it soon: no polling
        }
        PollWhileHalted();
        return false;
    }

    // ---- halt polling (KVM's halt_poll_ns, for the HLTs this vcpu handles itself) ----

    /// <summary>The VM was told this halt (IF=0) may be the vcpu's last: it is told when the vcpu runs again.</summary>
    private bool _haltReported;

    /// <summary>When the guest halted (Stopwatch ticks); 0 when it is not halted.</summary>
    private long _haltedAt;

    private HaltPollWindow? _haltPoll;

    /// <summary>The window, up to actorvmm.vcpu.halt-poll (0 = never poll).</summary>
    private HaltPollWindow HaltPoll => _haltPoll ??= new HaltPollWindow(VcpuProtocol.HaltPollTicks(Context.System.Settings.Config));

    /// <summary>
    /// A guest that sleeps in HLT is often woken within microseconds (an IPI answered, a reply from
    /// a device). Looking at the mailbox for that long keeps the thread awake, so the wake-up is
    /// handled at once instead of through a sleep and a wake of the thread (which cost more than
    /// the wait on a VM host). Returns as soon as a message is in. The window adapts like KVM's:
    /// see <see cref="HaltPollWindow"/>.
    /// </summary>
    private void PollWhileHalted()
    {
        var window = HaltPoll.Ticks;
        if (window <= 0) return;
        SpinUntilMessage(_haltedAt + window);
    }

    /// <summary>On a wake-up from HLT: the window learns how long this halt lasted.</summary>
    private void AdaptHaltPoll()
    {
        // The halt lasted until the wake-up was sent. A thread that slept through it (the poll
        // missed) gets to it later, and counting that delay would make the window shrink because
        // it missed: it would then miss again.
        var now = System.Diagnostics.Stopwatch.GetTimestamp();
        var woken = _vcpuQueue?.LastUrgentTicks ?? 0;
        HaltPoll.Woken((woken > _haltedAt && woken <= now ? woken : now) - _haltedAt);
        _haltedAt = 0;
    }

    /// <summary>
    /// Before every entry: queue an NMI, then at most one external interrupt (an injected vector,
    /// else the vlapic's, else an ExtINT from the PIC) if the guest can take one. False when the
    /// vcpu must first wait for the PIC's INTA reply.
    /// </summary>
    private bool PrepareEntry()
    {
        for (; _nmisPending > 0; _nmisPending--)
        {
            try { _vcpu.InjectNmi(); }
            catch (KvmException) { /* an NMI KVM refuses is lost, as one arriving while another is latched */ }
        }
        if (!_injectionQueued && _vcpu.ReadyForInterruptInjection)
        {
            if (_pendingVectors.Count > 0)
            {
                InjectNow(_pendingVectors.Dequeue());
            }
            else if (_lapicVector is { } vector && vector >> 4 > _cr8) // CR8 may hold it back (§10.8.3.1)
            {
                _lapicVector = null;
                InjectNow(vector);
                AcceptLapicVector(vector);
            }
            else if (_extIntPending && _wiring.Pic is { } pic)
            {
                // INTA: the vector comes from the 8259; wait for it like for a device read.
                _readId = ++_nextReadId;
                _intaInFlight = true;
                pic.Tell(new DeviceProtocol.Acknowledge(_readId), Self);
                Switch(_waitingForRead);
                return false;
            }
        }
        // KVM_EXIT_IRQ_WINDOW_OPEN is not reliable here: ask for it, and also re-check on every exit.
        // (A vector CR8 holds back waits for the exit that lowers CR8: no window for it.)
        _vcpu.RequestInterruptWindow = _pendingVectors.Count > 0 || _lapicVector is { } v && v >> 4 > _cr8 || _extIntPending;
        return true;
    }

    /// <summary>Tells the vlapic the vector went in (vlapic_intr_accepted); in a trace, as caused by
    /// the report that made it pending, not by whatever the vcpu handled last.</summary>
    private void AcceptLapicVector(byte vector)
    {
        if (_trace is null)
        {
            _wiring.Vlapic?.Tell(VlapicProtocol.InterruptAccepted.Of(vector), Self);
            return;
        }
        var saved = TraceContext.Save();
        TraceContext.Enter(Self, _lapicVectorCause);
        _wiring.Vlapic?.Tell(VlapicProtocol.InterruptAccepted.Of(vector), Self);
        TraceContext.Restore(saved);
    }

    /// <summary>The guest may have written CR8 without an exit (raising it never exits; lowering it
    /// exits as KVM_EXIT_SET_TPR on most hosts): its TPR goes to the vlapic, which arbitrates with it.</summary>
    private void SyncCr8()
    {
        var cr8 = (byte)(_vcpu.Cr8 & 0xF);
        if (cr8 == _cr8) return;
        _cr8 = cr8;
        _wiring.Vlapic!.Tell(new VlapicProtocol.SetTaskPriority((byte)(cr8 << 4)), Self);
    }

    private void InjectNow(byte vector)
    {
        _vcpu.InjectInterrupt(vector);
        _injectionQueued = true;
        _injected++;
    }

    // ---- in-kernel local APIC (lapic = assisted) ----

    /// <summary>
    /// HLT does not exit with an in-kernel APIC: the vcpu sleeps inside KVM_RUN. This probe (every
    /// <see cref="HaltProbeInterval"/>, between two runs) reads KVM's MP state; halted with IF=0 is
    /// reported to the VM once per halt, as a HLT exit with IF=0 is for an emulated APIC. The vcpu
    /// keeps running: an NMI or INIT from the kernel APIC can still wake it.
    /// </summary>
    private void ProbeKernelHalt()
    {
        if (!_wiring.KernelLapic) return;
        try
        {
            var mp = _vcpu.GetMpState();
            if (!_kernelStarted) NoteKernelStart(mp);
            if (mp != KvmMpState.Halted)
            {
                if (_kernelHaltReported) _wiring.Vm.Tell(new VcpuWoken(Id));
                _kernelHaltReported = false;
                _eoiFlushed = false;
                return;
            }
            var interruptsEnabled = (_vcpu.GetRegisters().Rflags & RflagsIf) != 0;
            if (interruptsEnabled && !_eoiFlushed && Kvm.IsPvm) FlushLostEoi();
            if (_kernelHaltReported || interruptsEnabled) return;
        }
        catch (KvmException)
        {
            return;
        }
        _kernelHaltReported = true;
        _wiring.Vm.Tell(new VcpuHalted(Id));
    }

    private const ulong RflagsIf = 1UL << 9;

    /// <summary>This halt was already checked for a lost level EOI.</summary>
    private bool _eoiFlushed;

    /// <summary>
    /// kvm_pvm (<see cref="Kvm.IsPvm"/>) can keep a level EOI's exit owed while the vcpu sleeps in
    /// HLT, leaving the IOAPIC's Remote IRR set and the line dead. When the kernel APIC shows a level
    /// vector retired (TMR set, neither requested nor in service) during a halt, the vcpu is made
    /// runnable once: its next entry delivers the owed exit, and the guest's HLT returns early (a
    /// wake-up any idle loop tolerates). At most once per halt.
    /// </summary>
    private void FlushLostEoi()
    {
        _eoiFlushed = true;
        var page = _vcpu.GetLapic();
        const int isr = 0x100, tmr = 0x180, irr = 0x200;
        for (var word = 0; word < 8; word++)
        {
            var retired = BitConverter.ToUInt32(page, tmr + word * 0x10) &
                          ~BitConverter.ToUInt32(page, isr + word * 0x10) & ~BitConverter.ToUInt32(page, irr + word * 0x10);
            if (retired == 0) continue;
            _vcpu.SetMpState(KvmMpState.Runnable);
            return;
        }
    }

    /// <summary>An AP under an in-kernel APIC is started by KVM at its SIPI; the VM learns of it at
    /// the first exit (or probe) that finds it out of wait-for-SIPI. The vector is read back from CS.</summary>
    private void NoteKernelStart(KvmMpState? known = null)
    {
        try
        {
            var mp = known ?? _vcpu.GetMpState();
            if (mp is KvmMpState.Uninitialized or KvmMpState.InitReceived) return;
            _kernelStarted = true;
            var cs = _vcpu.GetSpecialRegisters().Cs;
            _wiring.Vm.Tell(new StartedBySipi(Id, (byte)(cs.Selector >> 8)));
        }
        catch (KvmException)
        {
            // MP state unknown: try again at the next exit.
        }
    }

    /// <summary>KVM_GET_LAPIC for the vlapic's GetState (forwarded: the reply goes to the asker).</summary>
    private void ReplyKernelLapic()
    {
        try
        {
            var registers = _vcpu.GetLapic();
            var apicBase = _vcpu.GetSpecialRegisters().ApicBase;
            var deadline = _vcpu.GetMsrs(ApicMsrs.TscDeadline) is [var entry] ? entry.Data : 0;
            Sender.Tell(new VlapicProtocol.StateReply(Id, KvmAssistedLapicBackend.StateFromKernel(registers, apicBase, deadline)));
        }
        catch (Exception e) when (e is KvmException or NotSupportedException)
        {
            Sender.Tell(new Refused(Id, nameof(VlapicProtocol.ReadKernelLapic), e.Message));
        }
    }

    private void WriteKernelLapic(LapicState state)
    {
        try
        {
            _vcpu.SetLapic(KvmAssistedLapicBackend.KernelImage(state, VcpuHandle.LapicStateSize));
            Sender.Tell(new VlapicProtocol.StateRestored(Id));
        }
        catch (Exception e) when (e is KvmException or NotSupportedException)
        {
            Sender.Tell(new Refused(Id, nameof(VlapicProtocol.WriteKernelLapic), e.Message));
        }
    }

    private void StopWith(StopReason reason, string report)
    {
        // any --Stop/fatal--> Stopped
        _state = State.Stopped;
        Switch(_stopped);
        Stash.UnstashAll();
        var stopped = new VcpuProtocol.Stopped(Id, reason, report);
        _wiring.Vm.Tell(stopped);
        if (!Sender.IsNobody() && !Sender.Equals(_wiring.Vm) && !Sender.Equals(Self)) Sender.Tell(stopped);
    }

    private void ReplyRegisters()
    {
        try
        {
            Sender.Tell(new Registers(Id, _state, RegisterState.From(_vcpu.GetRegisters()),
                SpecialRegisterState.From(_vcpu.GetSpecialRegisters())));
        }
        catch (KvmException e)
        {
            Sender.Tell(new Refused(Id, nameof(GetRegisters), e.Message));
        }
    }

    private readonly ExitStats _exitStats = new();

    private void ReplyStats() =>
        Sender.Tell(new Stats(Id, _state, _exits, _ioExits, _mmioExits, _hltExits, _intrExits,
            _unassignedReads, _unassignedWrites, _injected) { Reasons = _exitStats.Snapshot() });

    private static ulong LittleEndian(ReadOnlySpan<byte> bytes)
    {
        ulong v = 0;
        for (var i = bytes.Length - 1; i >= 0; i--) v = (v << 8) | bytes[i];
        return v;
    }
}
