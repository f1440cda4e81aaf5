using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

/// <summary>
/// The vcpu actor's protocol. Requests are <see cref="IVcpuNotify"/>: the vcpu's mailbox kicks the
/// vcpu thread out of KVM_RUN for them, so they are handled before the guest runs again.
/// </summary>
public static class VcpuProtocol
{
    /// <summary>Dispatcher and mailbox ids (defined in <see cref="DefaultConfig"/> and hocon/default.conf).</summary>
    public const string DispatcherId = "actorvmm.vcpu-dispatcher";
    public const string MailboxId = "actorvmm.vcpu-mailbox";

    /// <summary>actorvmm.vcpu.halt-poll when the configuration does not say (KVM's halt_poll_ns default).</summary>
    public const string DefaultHaltPoll = "200us";

    public const string DefaultConfig = $$"""
        actorvmm.vcpu-dispatcher {
          type = PinnedDispatcher
          executor = thread-pool-executor
          thread-pool-executor.allow-core-timeout = off
          throughput = 100
        }
        actorvmm.vcpu-mailbox {
          mailbox-type = "ActorVmm.Vcpu.VcpuMailboxType, ActorVmm.Actors.Vcpu"
        }
        actorvmm.vcpu {
          halt-poll = {{DefaultHaltPoll}}
        }
        actorvmm.vlapic-dispatcher {
          type = "ActorVmm.Devices.Timing.InlineDispatcherConfigurator, ActorVmm.Actors.Devices"
          throughput = 64
        }
        actorvmm.device-dispatcher {
          type = "ActorVmm.Devices.Timing.InlineDispatcherConfigurator, ActorVmm.Actors.Devices"
          throughput = 64
        }
        """;

    /// <summary>The longest halt poll, actorvmm.vcpu.halt-poll: "0" (off) or a duration of at most
    /// 1 ms ("50us", "0.2ms"). A value outside that is refused.</summary>
    public static TimeSpan HaltPoll(Akka.Configuration.Config config)
    {
        var text = (config.GetString("actorvmm.vcpu.halt-poll", DefaultHaltPoll) ?? "").Trim();
        if (text == "0") return TimeSpan.Zero;
        foreach (var (suffix, us) in new[] { ("us", 1.0), ("µs", 1.0), ("ms", 1000.0) })
            if (text.EndsWith(suffix, StringComparison.Ordinal) &&
                double.TryParse(text[..^suffix.Length], System.Globalization.NumberStyles.Float,
                    System.Globalization.CultureInfo.InvariantCulture, out var n) && n >= 0 && n * us <= 1000)
                return TimeSpan.FromMicroseconds(n * us);
        throw new FormatException($"actorvmm.vcpu.halt-poll must be 0 (off) or a duration of at most 1ms like 50us or 0.2ms, not \"{text}\"");
    }

    /// <summary><see cref="HaltPoll"/> in Stopwatch ticks; an unreadable value means no polling here
    /// (the configuration is checked, with a clear error, before a VM is built).</summary>
    internal static long HaltPollTicks(Akka.Configuration.Config config)
    {
        try { return (long)(HaltPoll(config).TotalSeconds * System.Diagnostics.Stopwatch.Frequency); }
        catch (FormatException) { return 0; }
    }

    /// <summary>The vlapics' and the APIC router's dispatcher: they run on the sender's thread
    /// (<see cref="ActorVmm.Devices.Timing.InlineDispatcher"/>).</summary>
    public const string VlapicDispatcherId = "actorvmm.vlapic-dispatcher";

    public interface IVcpuMessage;

    /// <summary>A request to the vcpu: it needs the vcpu between two runs, so it kicks.</summary>
    public interface IVcpuRequest : IVcpuMessage, IVcpuNotify;

    /// <summary>Every state of a vcpu (the actor's one state variable).</summary>
    public enum State
    {
        /// <summary>Built, not started.</summary>
        Created,
        /// <summary>In the guest, or between two runs with nothing to wait for.</summary>
        Running,
        /// <summary>Out of the guest on request, until <see cref="Resume"/>.</summary>
        Paused,
        /// <summary>In HLT (an emulated local APIC), until an interrupt, NMI or INIT.</summary>
        Halted,
        /// <summary>For good: no more guest code, only reads of its state.</summary>
        Stopped,
        /// <summary>An AP after INIT, until a SIPI sets CS:IP (SDM Vol 3A §8.4.1).</summary>
        WaitingForSipi,
        /// <summary>The guest wrote to a device that ends the machine (debug-exit, reset): no more guest
        /// code; the VM is about to stop the vcpu.</summary>
        Ending,
        /// <summary>Out of the guest until a reply is in: a device read, a write that may end the
        /// machine, the vlapic's answer to an APIC MSR access, the 8259's INTA vector.</summary>
        WaitingForReply,
        /// <summary>Out of the guest until a device whose write window is full credits writes back.</summary>
        WaitingForCredit,
    }

    public enum StopReason
    {
        /// <summary>Stopped on request (Stop, VM shutdown).</summary>
        Requested,
        /// <summary>HLT with interrupts disabled and nothing pending: the guest is done.</summary>
        HaltedForever,
        /// <summary>Triple fault (KVM_EXIT_SHUTDOWN).</summary>
        TripleFault,
        /// <summary>KVM_EXIT_INTERNAL_ERROR (an instruction KVM could not emulate, ...).</summary>
        InternalError,
        /// <summary>VM entry failed (KVM_EXIT_FAIL_ENTRY).</summary>
        FailEntry,
        /// <summary>An exit this VMM does not handle.</summary>
        UnhandledExit,
        /// <summary>A system event (KVM_EXIT_SYSTEM_EVENT) asked for shutdown/reset.</summary>
        SystemEvent,
        /// <summary>KVM_RUN itself failed.</summary>
        RunFailed,
        /// <summary>The snapshot the vcpu was built with could not be put into KVM.</summary>
        RestoreFailed,
    }

    /// <summary>Created → Running: the vcpu thread binds itself and enters the guest.</summary>
    public sealed record Start : IVcpuRequest { public static readonly Start Instance = new(); }

    /// <summary>Running/Halted → Paused; answered with <see cref="Paused"/> once out of the guest.</summary>
    public sealed record Pause : IVcpuRequest { public static readonly Pause Instance = new(); }

    /// <summary>Paused → the state before the pause.</summary>
    public sealed record Resume : IVcpuRequest { public static readonly Resume Instance = new(); }

    /// <summary>Any → Stopped. Answered with <see cref="Stopped"/> to the VM.</summary>
    public sealed record Stop : IVcpuRequest { public static readonly Stop Instance = new(); }

    /// <summary>Injects an external interrupt (vector) as soon as the guest can take it.</summary>
    public sealed record InjectInterrupt(byte Vector) : IVcpuRequest;

    public sealed record GetRegisters : IVcpuRequest { public static readonly GetRegisters Instance = new(); }

    public sealed record SetRegisters(RegisterState? Registers, SpecialRegisterState? Special) : IVcpuRequest;

    public sealed record GetStats : IVcpuRequest { public static readonly GetStats Instance = new(); }

    /// <summary>
    /// Saves the vcpu for a snapshot; only while <see cref="State.Paused"/> (else <see cref="Refused"/>).
    /// Answered <see cref="SavedState"/>, or <see cref="Refused"/> when KVM cannot give the state. A
    /// paused vcpu is at an instruction boundary: it pauses only with no reply in flight, and saving
    /// completes its last exit in KVM (<see cref="VcpuHandle.SaveState"/>). The vcpu stays paused; a
    /// <see cref="Resume"/> lets it go on.
    /// </summary>
    public sealed record SaveState : IVcpuRequest { public static readonly SaveState Instance = new(); }

    // Replies and events.
    public sealed record Paused(int VcpuId) : IVcpuMessage;

    public sealed record Resumed(int VcpuId) : IVcpuMessage;

    public sealed record Registers(int VcpuId, State State, RegisterState General, SpecialRegisterState Special) : IVcpuMessage;

    public sealed record RegistersSet(int VcpuId) : IVcpuMessage;

    /// <summary>The answer to <see cref="SaveState"/>.</summary>
    public sealed record SavedState(int VcpuId, VcpuSnapshot Snapshot) : IVcpuMessage;

    /// <summary>Told to whoever sent <see cref="Start"/> to a vcpu built with a snapshot, once the
    /// snapshot is in KVM and the vcpu is in <see cref="VcpuSnapshot.ResumeIn"/>. A snapshot KVM
    /// refuses stops the vcpu instead (<see cref="Stopped"/> with <see cref="StopReason.RestoreFailed"/>).</summary>
    public sealed record Restored(int VcpuId, State State) : IVcpuMessage;

    /// <summary>Told to the VM when the vcpu stops for good; <see cref="Report"/> is for people.</summary>
    public sealed record Stopped(int VcpuId, StopReason Reason, string Report) : IVcpuMessage;

    /// <summary>Told to the VM when the vcpu halts with interrupts disabled and nothing pending:
    /// the guest is done unless an NMI or INIT comes. (A halt with interrupts enabled is the idle
    /// loop of a guest waiting for its next interrupt: nobody is told.)</summary>
    public sealed record VcpuHalted(int VcpuId) : IVcpuMessage;

    /// <summary>Told to the VM when a vcpu it was told of with <see cref="VcpuHalted"/> runs again
    /// (an NMI or INIT woke it): the VM no longer counts it as halted for good.</summary>
    public sealed record VcpuWoken(int VcpuId) : IVcpuMessage;

    /// <summary>
    /// Device <paramref name="Device"/>'s (actor <paramref name="Actor"/>) range seen at offset window
    /// <paramref name="Window"/>, <paramref name="Length"/> bytes, now decodes at guest-physical
    /// <paramref name="Base"/> (null: nowhere), e.g. a PCI BAR the guest moved or whose memory decoding
    /// it turned on or off. The vcpu moves the range on its MMIO bus before the guest runs again, in any
    /// state, and answers <see cref="MmioMapped"/>. A range that would overlap another device's is not
    /// decoded (the PCI spec leaves overlapping BARs undefined; the earlier device keeps its range).
    /// </summary>
    public sealed record MapMmio(long Id, string Device, IActorRef Actor, ulong Window, ulong Length, ulong? Base) : IVcpuMessage, IVcpuNotify;

    /// <param name="Id">the <see cref="MapMmio"/>'s id</param>
    /// <param name="VcpuId">the vcpu whose bus now has it</param>
    /// <param name="Decoded">false when the range overlapped another device's and is not decoded</param>
    public sealed record MmioMapped(long Id, int VcpuId, bool Decoded) : IVcpuMessage;

    /// <summary>Told to the VM when an AP leaves wait-for-SIPI and starts running at
    /// <paramref name="Vector"/> &lt;&lt; 12 (the VM then counts it among its started vcpus).</summary>
    public sealed record StartedBySipi(int VcpuId, byte Vector) : IVcpuMessage;

    /// <summary>A trace event, not a message: the vcpu left the guest (recorded only when the
    /// VM is traced; what the vcpu sends while handling it has it as causal parent).</summary>
    public sealed record GuestExit(int VcpuId, string Reason, ulong Address, int Size, bool Write, ulong Value) : IVcpuMessage;

    /// <summary>A request this vcpu could not satisfy in its current state.</summary>
    public sealed record Refused(int VcpuId, string Request, string Why) : IVcpuMessage;

    public sealed record Stats(int VcpuId, State State, long Exits, long IoExits, long MmioExits, long HltExits,
        long IntrExits, long UnassignedReads, long UnassignedWrites, long Injected) : IVcpuMessage
    {
        /// <summary>Per exit reason: count and handling-latency histogram.</summary>
        public ExitReasonStats[] Reasons { get; init; } = [];
    }

    /// <summary><see cref="LatencyBuckets"/>[0] counts exits handled in under 1 µs, [i] those in
    /// [2^(i-1), 2^i) µs, the last one those of 1024 µs or more.</summary>
    public sealed record ExitReasonStats(string Reason, long Count, long[] LatencyBuckets);

    /// <summary>Everything the vcpu needs from the VM it belongs to. Local wiring, not a message.</summary>
    /// <param name="Ports">the port bus: which device actor answers which ports</param>
    /// <param name="Mmio">the MMIO bus: which device actor answers which guest-physical ranges</param>
    /// <param name="Vm">the VM actor: told when the vcpu stops, halts for good, wakes or starts by SIPI</param>
    /// <param name="Memory">guest memory, for the report of a vcpu that cannot go on (the code at RIP); null: none</param>
    /// <param name="Vlapic">this vcpu's local APIC actor (null: no APIC; APIC MSR exits #GP as any
    /// other). It sends the vcpu <c>VlapicProtocol.IVcpuEvent</c>s, answers <c>MsrRead</c>/<c>MsrWrite</c>
    /// and is told <c>InterruptAccepted</c>; its MMIO page is an ordinary route on <paramref name="Mmio"/>.</param>
    /// <param name="Pic">the 8259 actor answering INTA (<see cref="DeviceProtocol.Acknowledge"/>) for
    /// ExtINT; null: ExtINT events are dropped</param>
    /// <param name="KernelLapic">the local APIC is KVM's (split irqchip, <c>lapic = assisted</c>): KVM
    /// keeps the MP state (an AP's KVM_RUN sleeps in the kernel until its SIPI), HLT never exits,
    /// so a halted vcpu is found by probing its MP state; EOIs of level vectors exit to the vlapic</param>
    /// <param name="Vmspace">the vmspace: a vcpu with a dirty ring sends it what it harvests after a
    /// ring-full exit (<c>VmspaceProtocol.DirtyRingHarvested</c>); null: such harvests are dropped</param>
    /// <param name="ApicPage">the route to <paramref name="Vlapic"/>'s xAPIC register page (an emulated
    /// APIC): decoded at 0xFEE00000 from reset, then where IA32_APIC_BASE puts it
    /// (<c>VlapicProtocol.ApicBaseChanged</c>), in front of the MMIO bus; null: no page (none, or
    /// KVM's APIC answers it)</param>
    public sealed record Wiring(AddressBus<DeviceRoute> Ports, AddressBus<DeviceRoute> Mmio, IActorRef Vm, IGuestMemory? Memory,
        IActorRef? Vlapic = null, IActorRef? Pic = null, bool KernelLapic = false, IActorRef? Vmspace = null,
        DeviceRoute? ApicPage = null)
    {
        /// <summary>Called on the vcpu's thread just before its first KVM_RUN, with its id and a
        /// <see cref="System.Diagnostics.Stopwatch.GetTimestamp"/> reading (start-up and restore latency).</summary>
        public Action<int, long>? OnFirstEntry { get; init; }
    }

    /// <param name="vcpu">the KVM vcpu, owned by the actor's thread</param>
    /// <param name="wiring">its devices, VM, vlapic, ...</param>
    /// <param name="restore">a snapshot to go on from (<see cref="SavedState"/>), or null for a vcpu
    /// at reset. At <see cref="Start"/> the vcpu writes it into KVM on its own thread and moves to
    /// its <see cref="VcpuSnapshot.ResumeIn"/> state (answering <see cref="Restored"/>): every vcpu
    /// of a restored VM is sent Start, its APs too.</param>
    public static Props Props(IVcpu vcpu, Wiring wiring, VcpuSnapshot? restore = null) =>
        Akka.Actor.Props.Create(() => new VcpuActor(vcpu, wiring, restore))
            .WithDispatcher(DispatcherId)
            .WithMailbox(MailboxId);

    /// <summary>Props for a unit test: the default dispatcher, the vcpu mailbox.</summary>
    public static Props PropsForTest(IVcpu vcpu, Wiring wiring, VcpuSnapshot? restore = null) =>
        Akka.Actor.Props.Create(() => new VcpuActor(vcpu, wiring, restore)).WithMailbox(MailboxId);
}

/// <summary>
/// Where a bus range goes: a device actor, the offset window the range starts at inside the device
/// (<see cref="Window"/>: a device owning several ranges tells them apart by offset), and the
/// vcpu's count of posted writes to the device not yet credited back (see <see cref="DeviceProtocol"/>),
/// shared by every window of the device. Owned by one vcpu.
/// </summary>
public sealed class DeviceRoute
{
    private sealed class Flow
    {
        public int InFlight;
    }

    private readonly Flow _flow;

    /// <param name="name">the device's name, in reports and traces</param>
    /// <param name="device">the device actor</param>
    /// <param name="waitForWrites">the vcpu waits for each write (<see cref="DeviceProtocol.WriteAndWait"/>):
    /// for devices whose writes can end the machine</param>
    /// <param name="waitForWriteAt">offsets (device offsets, window included) whose writes the vcpu
    /// waits for even when others are posted: a local APIC's TPR, whose raise must hold back an
    /// interrupt before the guest's next instruction</param>
    public DeviceRoute(string name, IActorRef device, bool waitForWrites = false, Func<ulong, bool>? waitForWriteAt = null)
        : this(name, device, 0, new Flow(), waitForWrites, waitForWriteAt)
    {
    }

    private DeviceRoute(string name, IActorRef device, ulong window, Flow flow, bool waitForWrites, Func<ulong, bool>? waitForWriteAt)
    {
        Name = name;
        Device = device;
        Window = window;
        _flow = flow;
        WaitForWrites = waitForWrites;
        _waitForWriteAt = waitForWriteAt;
    }

    private readonly Func<ulong, bool>? _waitForWriteAt;

    /// <summary>Whether a write at device offset <paramref name="offset"/> waits for <see cref="DeviceProtocol.WriteDone"/>.</summary>
    public bool WaitsForWriteAt(ulong offset) => WaitForWrites || (_waitForWriteAt?.Invoke(offset) ?? false);

    public string Name { get; }
    public IActorRef Device { get; }

    /// <summary>Writes are not posted: the vcpu waits for <see cref="DeviceProtocol.WriteDone"/>.</summary>
    public bool WaitForWrites { get; }

    /// <summary>Added to the offset inside the range: the device sees <c>Window + (address - base)</c>.</summary>
    public ulong Window { get; }

    /// <summary>Another range of the same device, at offset window <paramref name="window"/>, sharing this route's write window.</summary>
    public DeviceRoute WithWindow(ulong window) => new(Name, Device, window, _flow, WaitForWrites, _waitForWriteAt);

    internal int InFlight
    {
        get => _flow.InFlight;
        set => _flow.InFlight = value;
    }

    public override string ToString() => Name;
}
