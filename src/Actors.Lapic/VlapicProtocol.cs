using Akka.Actor;
using ActorVmm.Devices;

namespace ActorVmm.Lapic;

/// <summary>
/// The vlapic actor's protocol: one actor per vcpu, owning that vcpu's local APIC backend.
///
/// It answers its vcpu's xAPIC register page, at <see cref="MmioBase"/> from reset and then where
/// IA32_APIC_BASE puts it (<see cref="ApicBaseChanged"/>): <see cref="DeviceProtocol.Read"/> /
/// <see cref="DeviceProtocol.Write"/>, offsets inside the page, write credits as any device; and
/// answers the vcpu's APIC MSR exits (<see cref="MsrRead"/> / <see cref="MsrWrite"/>, synchronous
/// because a refused access is a #GP). It tells the vcpu <see cref="IVcpuEvent"/>s and the vcpu
/// answers <see cref="InterruptAccepted"/>. Outgoing IPIs (<see cref="Ipi"/>) go to the router;
/// level EOIs (<see cref="LevelEoi"/>) to the EOI target (the IOAPIC, possibly through the router).
/// </summary>
public static class VlapicProtocol
{
    public const ulong MmioBase = LocalApic.DefaultBaseAddress;
    public const ulong MmioLength = LocalApic.PageSize;
    /// <summary>The xAPIC TPR register in the page: the vcpu waits for its writes (a raised TPR must
    /// hold back a pending interrupt before the guest's next instruction, SDM §10.8.3.1).</summary>
    public const ulong TprOffset = 0x80;

    public interface IVlapicMessage;

    // ---- To the vcpu ---------------------------------------------------------------------------

    /// <summary>An event for the vcpu (the seed's vcpu_notify_event: the vcpu's mailbox kicks it out
    /// of the guest, see <see cref="ActorVmm.Devices.IVcpuNotify"/>).</summary>
    public interface IVcpuEvent : IVlapicMessage, ActorVmm.Devices.IVcpuNotify
    {
        int VcpuId { get; }
    }

    /// <summary>The highest vector the vcpu should take now. Supersedes an earlier one; the vcpu
    /// injects it when the guest can (KVM_INTERRUPT) and answers <see cref="InterruptAccepted"/>.
    /// <paramref name="Seq"/> numbers the vlapic's reports (from 1; kept across its restarts): the
    /// vcpu ignores a report not newer than the last it saw, so a duplicated or late one cannot
    /// inject a vector twice. 0 = unnumbered (taken as new).</summary>
    public sealed record InterruptPending(int VcpuId, byte Vector, long Seq = 0) : IVcpuEvent;

    /// <summary>The vector reported last is no longer deliverable (the guest raised its TPR, or
    /// masked or retargeted the source): the vcpu drops it unless it was already injected (then its
    /// <see cref="InterruptAccepted"/> is on the way, as on hardware once the core took it).</summary>
    public sealed record NoInterruptPending(int VcpuId, long Seq) : IVcpuEvent;

    /// <summary>The TPR changed through the APIC page or an x2APIC MSR: the vcpu loads
    /// <c>Tpr &gt;&gt; 4</c> into the guest's CR8 before its next entry (CR8 aliases TPR[7:4]).</summary>
    public sealed record TaskPriorityChanged(int VcpuId, byte Tpr) : IVcpuEvent;

    /// <summary>IA32_APIC_BASE changed (a guest WRMSR, a restored state): the vcpu decodes the
    /// xAPIC page at the new base while the APIC is in xAPIC mode, and nowhere otherwise (SDM Vol 3A
    /// §10.4.4-10.4.5), and tells KVM the value, so that CPUID.01H:EDX.APIC follows
    /// IA32_APIC_BASE.EN as on a processor (§10.4.3). Sent while the vcpu waits for its WRMSR's
    /// answer, so it takes effect before the guest's next instruction.</summary>
    public sealed record ApicBaseChanged(int VcpuId, ulong ApicBase) : IVcpuEvent;

    public sealed record NmiPending(int VcpuId) : IVcpuEvent;

    public sealed record SmiPending(int VcpuId) : IVcpuEvent;

    /// <summary>Take the vector from the 8259 (INTA) when the guest can take an interrupt.</summary>
    public sealed record ExtIntPending(int VcpuId) : IVcpuEvent;

    /// <summary>INIT: the APIC has reset itself; an AP enters wait-for-SIPI.</summary>
    public sealed record InitReceived(int VcpuId) : IVcpuEvent;

    /// <summary>SIPI: an AP in wait-for-SIPI starts at CS = Vector &lt;&lt; 8, IP = 0.</summary>
    public sealed record StartupReceived(int VcpuId, byte Vector) : IVcpuEvent;

    // ---- From the vcpu -------------------------------------------------------------------------

    /// <summary>The vcpu injected <paramref name="Vector"/> (IRR → ISR).</summary>
    public sealed record InterruptAccepted(byte Vector) : IVlapicMessage
    {
        private static readonly InterruptAccepted[] ByVector = [.. Enumerable.Range(0, 256).Select(v => new InterruptAccepted((byte)v))];

        /// <summary>The one instance for <paramref name="vector"/> (the message is immutable): sent on
        /// every injection, it costs no allocation.</summary>
        public static InterruptAccepted Of(byte vector) => ByVector[vector];
    }

    /// <summary>An EOI that did not go through the register page (an assisted backend's EOI exit).</summary>
    public sealed record EndOfInterrupt(byte Vector) : IVlapicMessage;

    /// <summary>RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or 0x800-0x8FF; answered <see cref="MsrReadResult"/>.</summary>
    public sealed record MsrRead(long Id, uint Msr) : IVlapicMessage;

    /// <summary><paramref name="Ok"/> false: inject #GP.</summary>
    public sealed record MsrReadResult(long Id, bool Ok, ulong Value) : IVlapicMessage;

    /// <summary>WRMSR; answered <see cref="MsrWriteResult"/>. <paramref name="GuestTsc"/>: the guest's TSC read
    /// after the exit, for IA32_TSC_DEADLINE (the timer re-pairs the guest's TSC with the VM clock by it).</summary>
    public sealed record MsrWrite(long Id, uint Msr, ulong Value, ulong? GuestTsc = null) : IVlapicMessage;

    public sealed record MsrWriteResult(long Id, bool Ok) : IVlapicMessage;

    /// <summary>Writes IA32_APIC_BASE (mode transitions of SDM §10.12.5); answered <see cref="MsrWriteResult"/>.</summary>
    public sealed record SetApicBase(long Id, ulong Value) : IVlapicMessage;

    // ---- From interrupt sources -----------------------------------------------------------------

    /// <summary>A destination to check before delivering (a router that broadcasts and lets each
    /// vlapic filter); without it the message is for this APIC.</summary>
    public sealed record Destination(DestinationMode Mode, uint Id);

    /// <summary>An interrupt message from the IOAPIC, an MSI, or another vlapic's IPI.</summary>
    public sealed record DeliverInterrupt(byte Vector, bool Level, TriggerMode Trigger, DeliveryMode Mode, Destination? To = null)
        : IVlapicMessage
    {
        private static readonly DeliverInterrupt[] FixedEdge =
            [.. Enumerable.Range(0, 256).Select(v => new DeliverInterrupt((byte)v, true, TriggerMode.Edge, DeliveryMode.Fixed))];

        /// <summary>A message for this APIC (no destination to check); the common fixed, edge-triggered
        /// ones (every ordinary IPI) are shared instances: the message is immutable.</summary>
        public static DeliverInterrupt For(byte vector, bool level, TriggerMode trigger, DeliveryMode mode) =>
            level && trigger == TriggerMode.Edge && mode == DeliveryMode.Fixed ? FixedEdge[vector] : new(vector, level, trigger, mode);
    }

    /// <summary>
    /// Lowest-priority arbitration by a chain: this APIC takes <paramref name="Interrupt"/> if its
    /// destination matches, else passes the message to <c>Rest[0]</c> with the rest of the chain; an
    /// empty chain drops it (nobody matched). The router orders the chain (see ApicRouter).
    /// </summary>
    public sealed record DeliverToFirstMatch(DeliverInterrupt Interrupt, System.Collections.Immutable.ImmutableArray<IActorRef> Rest)
        : IVlapicMessage;

    /// <summary>From the vcpu: the guest changed CR8, so TPR = <paramref name="Tpr"/> (CR8 &lt;&lt; 4).</summary>
    public sealed record SetTaskPriority(byte Tpr) : IVlapicMessage;

    /// <summary>Names the vcpu that receives this vlapic's <see cref="IVcpuEvent"/>s (replacing
    /// <see cref="Wiring.Vcpu"/>): the VM builder creates the vlapic before its vcpu, whose wiring
    /// needs the vlapic. Kept across restarts of the vlapic. Nothing is told before a vcpu is
    /// attached; once one is, it is told the pending vector, the TPR and IA32_APIC_BASE it does not
    /// know yet (a vlapic built from a snapshot: all three).</summary>
    public sealed record AttachVcpu(IActorRef Vcpu) : IVlapicMessage;

    public enum PinChange : byte { Assert, Deassert, Pulse }

    /// <summary>The LINT0 (Pin 0) or LINT1 (Pin 1) input changed (8259 INTR, NMI button).</summary>
    public sealed record Lint(int Pin, PinChange Change) : IVlapicMessage;

    // ---- Outgoing --------------------------------------------------------------------------------

    /// <summary>To the EOI target: a level-triggered vector was retired (IOAPIC clears Remote IRR).</summary>
    public sealed record LevelEoi(int VcpuId, byte Vector) : IVlapicMessage;

    // ---- Stats -----------------------------------------------------------------------------------

    public sealed record GetStats : IVlapicMessage
    {
        public static readonly GetStats Instance = new();
    }

    /// <summary>Counters of one vlapic since the VM started (kept across restarts): IPIs its vcpu
    /// sent through the APIC router (an ICR write with a destination; a self-IPI by shorthand
    /// stays inside the APIC and is not counted), interrupts delivered to it (fixed, lowest-priority,
    /// NMI, INIT, SIPI, ExtINT, from devices and IPIs alike), vectors its vcpu accepted, timer
    /// callbacks handled, restarts after a failure. An in-kernel APIC (assisted) counts only what
    /// passes through the actor.</summary>
    public sealed record Stats(int VcpuId, long IpisSent, long Delivered, long Accepted, long TimerCallbacks, int Restarts)
        : IVlapicMessage;

    // ---- Snapshot --------------------------------------------------------------------------------

    public sealed record GetState : IVlapicMessage
    {
        public static readonly GetState Instance = new();
    }

    public sealed record StateReply(int VcpuId, LapicState State) : IVlapicMessage;

    /// <summary>To the vcpu of an in-kernel APIC (KvmAssisted), forwarded by its vlapic: read
    /// KVM_GET_LAPIC between two runs and answer <see cref="StateReply"/> to the original sender.</summary>
    public sealed record ReadKernelLapic(int VcpuId) : IVlapicMessage;

    /// <summary>To the vcpu of an in-kernel APIC, forwarded by its vlapic: KVM_SET_LAPIC from the
    /// first 1 KiB of the page, then answer <see cref="StateRestored"/> to the original sender.</summary>
    public sealed record WriteKernelLapic(int VcpuId, LapicState State) : IVlapicMessage;

    /// <summary>Replaces the APIC's state; answered <see cref="StateRestored"/>.</summary>
    public sealed record RestoreState(LapicState State) : IVlapicMessage;

    public sealed record StateRestored(int VcpuId) : IVlapicMessage;

    /// <summary>Who the vlapic talks to. Local wiring, not a message.</summary>
    /// <param name="Vcpu">receives <see cref="IVcpuEvent"/>s</param>
    /// <param name="Router">receives <see cref="Ipi"/>s</param>
    /// <param name="EoiTarget">receives <see cref="LevelEoi"/>s</param>
    /// <param name="Peers">the VM's vlapics: IPIs that need no arbitration go straight to them
    /// (null: every IPI goes to the router)</param>
    public sealed record Wiring(IActorRef Vcpu, IActorRef Router, IActorRef EoiTarget, ApicRouterProtocol.Targets? Peers = null);

    /// <param name="backend">the VM's choice; null: <see cref="LapicBackends.Emulated"/> with default options</param>
    /// <param name="clock">time for the APIC timer; null: the actor system scheduler's clock
    /// (<see cref="SchedulerClock"/>, virtual under TestKit's TestScheduler). A VM passes its one
    /// shared device clock so that all timers agree.</param>
    /// <param name="vcpuId">the vcpu (and APIC ID) this vlapic belongs to</param>
    /// <param name="wiring">its vcpu, router and EOI target</param>
    /// <param name="initial">an emulated APIC's state to start from (a snapshot's <see cref="StateReply"/>),
    /// null: reset. Its armed timer is a deadline on <paramref name="clock"/>, which must continue the
    /// saved clock's timeline. Its pending vector (IRR), TPR and IA32_APIC_BASE are told to its vcpu
    /// once one is attached (<see cref="Wiring.Vcpu"/> or <see cref="AttachVcpu"/>). With KVM's APIC
    /// (<see cref="LapicBackendKind.KvmAssisted"/>) it must be null: that state is KVM's, restored with
    /// the vcpu (<c>VcpuKvmState.Lapic</c>), and the actor holds none of its own.</param>
    public static Props Props(int vcpuId, Wiring wiring, LapicBackendFactory? backend = null, IDeviceClock? clock = null,
        LapicState? initial = null)
    {
        var cell = new VlapicCell { Vcpu = wiring.Vcpu, State = initial };
        return Akka.Actor.Props.Create(() => new VlapicActor(vcpuId, wiring, backend ?? LapicBackends.Emulated(null), clock, cell));
    }

    /// <summary>What survives a restart of the actor: its vcpu, and the APIC state saved when it failed.
    /// Local to one host (never sent).</summary>
    internal sealed class VlapicCell
    {
        public volatile IActorRef Vcpu = ActorRefs.Nobody;
        public LapicState? State;
        /// <summary>The vector the failed incarnation had told its vcpu (not to be told twice).</summary>
        public int? Reported;
        public long IpisSent, Delivered, Accepted, TimerCallbacks;
        /// <summary>The last <see cref="InterruptPending.Seq"/> sent.</summary>
        public long Seq;
        public int Restarts;
    }
}
