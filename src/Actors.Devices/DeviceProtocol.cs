using Akka.Actor;

namespace ActorVmm.Devices;

/// <summary>
/// Messages between a vcpu (or any bus master) and a device actor. Writes are posted: the vcpu
/// does not wait. Reads carry a correlation id and are answered with <see cref="ReadResult"/>.
///
/// Flow control: a vcpu may have at most <see cref="WriteWindow"/> posted writes outstanding
/// per device; the device sends <see cref="WriteCredit"/> back every <see cref="CreditBatch"/>
/// writes from one sender, and a <see cref="ReadResult"/> acknowledges every write that came before
/// it (mailboxes are FIFO). A guest that floods a device therefore waits, instead of growing the
/// host's memory.
/// </summary>
public static class DeviceProtocol
{
    /// <summary>The device actors' dispatcher (hocon/default.conf): an
    /// <see cref="Timing.InlineDispatcher"/>, so a device runs on the thread that sends to it when it
    /// is idle (a vcpu's port or MMIO access is handled on the vcpu's thread, as bhyve's device
    /// emulation runs in its vcpu's context), still one message at a time.</summary>
    public const string DispatcherId = "actorvmm.device-dispatcher";

    public const int WriteWindow = 1024;
    public const int CreditBatch = 64;

    public interface IDeviceMessage;

    public enum Space : byte { Port, Mmio }

    /// <summary>A posted write of <paramref name="Size"/> bytes at an offset inside the device.</summary>
    public sealed record Write(ulong Offset, int Size, ulong Value) : IDeviceMessage;

    /// <summary>A read; the device replies <see cref="ReadResult"/> with the same id to the sender.</summary>
    public sealed record Read(long Id, ulong Offset, int Size) : IDeviceMessage;

    public sealed record ReadResult(long Id, ulong Value) : IDeviceMessage;

    /// <summary>
    /// A write the vcpu waits for, used for devices whose writes can end the machine (debug-exit,
    /// the i8042 reset line): the guest must run no further instruction after such a write, as on
    /// real hardware. Answered <see cref="WriteDone"/>, which (like a read's reply) acknowledges
    /// every earlier posted write.
    /// </summary>
    public sealed record WriteAndWait(long Id, ulong Offset, int Size, ulong Value) : IDeviceMessage;

    /// <param name="MachineEnding">the write asked the VM to exit, reset or power off: the vcpu stays out of
    /// the guest until the VM stops it</param>
    /// <param name="Id">the <see cref="WriteAndWait"/>'s id</param>
    public sealed record WriteDone(long Id, bool MachineEnding) : IDeviceMessage;

    /// <summary>The device has handled <paramref name="Count"/> more posted writes of the receiver.</summary>
    public sealed record WriteCredit(int Count) : IDeviceMessage;

    /// <summary>Bytes from the host for a device implementing <see cref="IHostInput"/>.</summary>
    public sealed record HostInput(byte[] Data) : IDeviceMessage;

    /// <summary>The host backend of an <see cref="IBackendInput"/> model has input (a TAP's fd is
    /// readable): the model takes it (<see cref="IBackendInput.BackendReady"/>); the device answers
    /// <see cref="Completed"/> with the same id once done, whatever the model is (a model without a
    /// backend ignores it), so the watcher of the backend can wait for it before watching again.</summary>
    public sealed record BackendReady(long Id) : IDeviceMessage;

    /// <summary>Sent by a device to the VM's event target: the guest asked the VM to end.</summary>
    public sealed record GuestExitRequested(string Device, int Status, string Reason) : IDeviceMessage;

    /// <summary>Sent by a device to the VM's event target: the guest asked for a reset.</summary>
    public sealed record GuestResetRequested(string Device, string Reason) : IDeviceMessage;

    /// <summary>Sent by a device to the VM's event target: the guest turned the machine off (ACPI S5).</summary>
    public sealed record GuestPowerOffRequested(string Device, string Reason) : IDeviceMessage;

    /// <summary>Drives interrupt input <paramref name="Line"/> of an <see cref="IInterruptInputs"/>
    /// model (IOAPIC pin, 8259 IRQ) to <paramref name="Level"/>. Posted; no credit is returned.</summary>
    public sealed record SetIrqLevel(int Line, bool Level) : IDeviceMessage;

    /// <summary>An edge on input <paramref name="Line"/> (assert then deassert).</summary>
    public sealed record PulseIrq(int Line) : IDeviceMessage;

    /// <summary>A LAPIC's EOI of a level-triggered <paramref name="Vector"/>, for an <see cref="IEndOfInterrupt"/> model.</summary>
    public sealed record EndOfInterrupt(byte Vector) : IDeviceMessage;

    /// <summary>INTA: an <see cref="IInterruptAcknowledge"/> model answers <see cref="Acknowledged"/> with the same id.</summary>
    public sealed record Acknowledge(long Id) : IDeviceMessage;

    /// <param name="Vector">null: no vector (controller not initialised, or not a controller)</param>
    /// <param name="StillRequested">the INTR output is still asserted after this acknowledge</param>
    /// <param name="Id">the <see cref="Acknowledge"/>'s id</param>
    public sealed record Acknowledged(long Id, int? Vector, bool StillRequested) : IDeviceMessage;

    /// <summary>
    /// From a device actor to the owner of guest memory it was built with (the vmspace), for a model's
    /// <see cref="IPlatformEvents.RequestPageFlush"/>: drop the hypervisor's mapping of the guest RAM
    /// page holding <paramref name="Gpa"/> (its contents stay), so the guest's next access to it faults
    /// in again. An address outside guest RAM is ignored. Answered <see cref="Completed"/> once done.
    /// </summary>
    public sealed record FlushGuestPage(string Device, long Id, ulong Gpa) : IDeviceMessage;

    /// <summary>A barrier: a device actor answers <see cref="Completed"/> with the same id, after
    /// everything the same sender told it before (mailbox order). A device whose write drives another
    /// device's input (an interrupt line) sends it after the change, to learn when it took effect.</summary>
    public sealed record Sync(long Id) : IDeviceMessage;

    /// <summary>The answer to a device actor's request (<see cref="FlushGuestPage"/>, <see cref="Sync"/>).</summary>
    public sealed record Completed(long Id) : IDeviceMessage;

    /// <summary>
    /// Asks a device for its model's state record (a snapshot): answered <see cref="StateReply"/>
    /// with the same id, after everything sent to the device before it (mailbox order). Send it
    /// while no vcpu runs, so the state is the one the guest last saw.
    /// </summary>
    public sealed record GetState(long Id) : IDeviceMessage;

    /// <param name="Id">the <see cref="GetState"/>'s id</param>
    /// <param name="Device">the device's name</param>
    /// <param name="State">the model's state record (<see cref="IStatefulDevice.SaveState"/>, one of the
    /// types <see cref="DeviceStateCodec"/> encodes); null: the model keeps no state (not an
    /// <see cref="IStatefulDevice"/>), or it could not save it (<paramref name="Error"/>)</param>
    /// <param name="Error">why the model could not save its state; null when it did (or has none)</param>
    public sealed record StateReply(long Id, string Device, object? State, string? Error = null) : IDeviceMessage;

    /// <summary>Asks a device for its access counters; answered with <see cref="Stats"/>.</summary>
    public sealed record GetStats : IDeviceMessage
    {
        public static readonly GetStats Instance = new();
    }

    /// <param name="Location">where the device runs when that is not simply beside its VM (a device on
    /// another host node, or brought back to the VM's node after that node was lost); null: beside its VM</param>
    public sealed record Stats(string Device, long Reads, long Writes, string? Location = null) : IDeviceMessage;

    /// <summary>
    /// From a device actor about to restart, as itself, to the owner of guest memory (the vmspace)
    /// it was built with: the guest pages the device holds (<c>GpaHold</c> leases, vm_gpa_hold) die
    /// with its incarnation, so the owner releases every hold the sender has. Sent before the new
    /// incarnation exists, so a hold it asks for later is not affected (mailbox order). No answer.
    /// </summary>
    public sealed record DeviceRestarting(string Device) : IDeviceMessage;

    /// <summary>What survives an actor restart: the model's last state record and counters.
    /// Local to one host (never sent).</summary>
    internal sealed class StateCell
    {
        /// <summary>The state the next incarnation is built from: the last incarnation's, or (before
        /// the first) the initial state the actor was made with.</summary>
        public object? State;
        public int Restarts;
        public int Restored;
        /// <summary>The last id of a request to another actor (<see cref="IDeviceRequests"/>): ids are
        /// never reused, so a late answer to a past incarnation completes nothing of the next one.</summary>
        public long LastRequestId;
    }

    /// <param name="name">device name used in messages and traces ("uart0")</param>
    /// <param name="factory">builds the model; called once per actor incarnation</param>
    /// <param name="events">receives <see cref="GuestExitRequested"/> / <see cref="GuestResetRequested"/> / <see cref="GuestPowerOffRequested"/>; may be Nobody</param>
    public static Props Props(string name, Func<IPlatformEvents, IBusDevice> factory, IActorRef events) =>
        Props(name, factory, null, events);

    /// <param name="restore">builds the model from a state record: the one its last incarnation saved
    /// (models implementing <see cref="IStatefulDevice"/>), or <paramref name="initialState"/>;
    /// null = restart from power-on</param>
    /// <param name="memory">the owner of the guest memory the device may hold pages of (the
    /// vmspace): told <see cref="DeviceRestarting"/> when the device restarts; null = none</param>
    /// <param name="initialState">a state record (from a snapshot) the FIRST incarnation is built
    /// from, by <paramref name="restore"/> instead of <paramref name="factory"/>; null = power-on.
    /// Requires <paramref name="restore"/>.</param>
    /// <param name="name">device name used in messages and traces ("uart0")</param>
    /// <param name="factory">builds the model; called once per actor incarnation without a saved state</param>
    /// <param name="events">receives <see cref="GuestExitRequested"/> / <see cref="GuestResetRequested"/> / <see cref="GuestPowerOffRequested"/>; may be Nobody</param>
    /// <param name="mirror">told after every message the actor handled (<see cref="IDeviceMirror"/>): for a
    /// device whose VM runs on another node; null = none</param>
    public static Props Props(string name, Func<IPlatformEvents, IBusDevice> factory,
        Func<IPlatformEvents, object, IBusDevice>? restore, IActorRef events, IActorRef? memory = null, object? initialState = null,
        IDeviceMirror? mirror = null)
    {
        var cell = InitialCell(name, restore, initialState);
        return Akka.Actor.Props.Create(() => new DeviceActor(name, factory, restore, events, cell, null, memory, mirror));
    }

    /// <summary>The cell of a new actor: holding <paramref name="initialState"/>, if any, so the first
    /// incarnation is restored from it as a restarted one is from its predecessor's.</summary>
    internal static StateCell InitialCell(string name, Func<IPlatformEvents, object, IBusDevice>? restore, object? initialState)
    {
        if (initialState is not null && restore is null)
            throw new ArgumentException($"device {name} is given an initial state but cannot be restored from one", nameof(initialState));
        return new StateCell { State = initialState };
    }

    /// <summary>Asks a device how often it restarted and whether from a state record.</summary>
    public sealed record GetHealth : IDeviceMessage
    {
        public static readonly GetHealth Instance = new();
    }

    /// <param name="RestoredFromState">restarts that continued from the last incarnation's state
    /// record (a first incarnation built from an initial state is not one)</param>
    public sealed record Health(string Device, int Restarts, int RestoredFromState) : IDeviceMessage;
}
