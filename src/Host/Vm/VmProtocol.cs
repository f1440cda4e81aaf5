using Akka.Actor;

namespace ActorVmm.Host.Vm;

/// <summary>The VM actor's protocol: lifecycle of one VM and how it ended.</summary>
public static class VmProtocol
{
    public interface IVmMessage;

    /// <summary>Starts the boot vcpu (the others wait for a SIPI).</summary>
    public sealed record Start : IVmMessage { public static readonly Start Instance = new(); }

    public sealed record Pause : IVmMessage { public static readonly Pause Instance = new(); }

    public sealed record Resume : IVmMessage { public static readonly Resume Instance = new(); }

    /// <summary>Stops the VM from outside (Ctrl-C, `ctl stop`).</summary>
    public sealed record Stop(string Reason) : IVmMessage;

    /// <summary>
    /// Snapshots the VM into <paramref name="Directory"/> (new or empty): every vcpu pauses at an
    /// instruction boundary, the devices drain, every actor's state and guest memory are written, then
    /// the VM resumes (stays paused if it was, or ends with <paramref name="StopAfter"/>). Answered
    /// <see cref="SnapshotTaken"/> or <see cref="SnapshotFailed"/> (the VM then goes on as before and
    /// nothing is left in the directory).
    /// </summary>
    /// <param name="PrecopiedMemory">a memory file kept current while write log <paramref name="WriteLog"/> was on
    /// (<see cref="CopyMemory"/> rounds, an earlier checkpoint's): the snapshot writes into it only the
    /// pages written since that log's last save and takes it as its memory part
    /// (<see cref="SnapshotTaken.WrittenPages"/> lists them)</param>
    /// <param name="WriteLog">the write log (<see cref="TrackMemoryWrites"/>) whose pages a
    /// <paramref name="PrecopiedMemory"/> snapshot writes; a whole snapshot starts that log over</param>
    public sealed record TakeSnapshot(string Directory, bool StopAfter = false, string? PrecopiedMemory = null, string? WriteLog = null) : IVmMessage;

    /// <param name="Paused">how long the guest was paused</param>
    /// <param name="Total">from the request to the manifest written</param>
    /// <param name="MemoryPages">guest pages written (the rest are holes: never touched)</param>
    public sealed record SnapshotTaken(string Vm, string Directory, long MemoryPages, long MemoryBytes, TimeSpan Paused, TimeSpan Total,
        bool Stopped) : IVmMessage
    {
        /// <summary>With <see cref="TakeSnapshot.PrecopiedMemory"/>: the RAM pages written into it.</summary>
        public ulong[]? WrittenPages { get; init; }
    }

    /// <summary>
    /// Starts or stops write log <paramref name="Log"/>, which tracks every write to guest RAM
    /// (<see cref="Memory.VmspaceProtocol.TrackWrites"/>), for a migration's pre-copy or checkpoints. Answered <see cref="Memory.VmspaceProtocol.WritesTracked"/> (by the vmspace).
    /// </summary>
    public sealed record TrackMemoryWrites(bool On, string Log = Memory.VmspaceProtocol.WriteLogs.Migration) : IVmMessage;

    /// <summary>
    /// Writes guest memory into memory file <paramref name="Path"/> while the VM runs: all of it, or with
    /// <paramref name="WrittenOnly"/> the pages written since write log <paramref name="Log"/>'s previous copy
    /// (see <see cref="TrackMemoryWrites"/>); a whole copy starts that log over. Answered <see cref="Memory.VmspaceProtocol.MemorySaved"/> (by the vmspace).
    /// </summary>
    public sealed record CopyMemory(string Path, bool WrittenOnly, string Log = Memory.VmspaceProtocol.WriteLogs.Migration) : IVmMessage;

    public sealed record SnapshotFailed(string Vm, string Directory, string Reason) : IVmMessage
    {
        /// <summary>Refused only because another snapshot of the VM was being taken: it may be asked again.</summary>
        public bool Busy { get; init; }
    }

    /// <summary>
    /// From a device actor (the sender): its range at offset window <paramref name="Window"/>,
    /// <paramref name="Length"/> bytes, now decodes at guest-physical <paramref name="Base"/> (null:
    /// nowhere), as a PCI function's BAR does when the guest moves it or turns memory decoding on or
    /// off. The VM moves it on every vcpu's MMIO bus (<c>VcpuProtocol.MapMmio</c>) and answers
    /// <see cref="Devices.DeviceProtocol.Completed"/> with <paramref name="Id"/> once every vcpu has,
    /// so a configuration write the guest waits for completes only then.
    /// </summary>
    public sealed record MapDeviceMmio(long Id, string Device, ulong Window, ulong Length, ulong? Base) : IVmMessage;

    /// <summary>Asks to be told <see cref="Ended"/> when the VM ends (at once if it has).</summary>
    public sealed record WatchEnd : IVmMessage { public static readonly WatchEnd Instance = new(); }

    public sealed record Ended(string Vm, Outcome Outcome) : IVmMessage;

    public sealed record GetStatus : IVmMessage { public static readonly GetStatus Instance = new(); }

    /// <summary>Supervision event: a child of the VM (a device, a vlapic, the APIC router) failed and
    /// is being restarted from its saved state. Told to the VM as the child, so traces show it.</summary>
    public sealed record ChildRestarted(string Child, string Cause) : IVmMessage;

    /// <param name="Devices">the names of its device actors (uart0, ioapic, ...), in creation order</param>
    /// <param name="Restarts">its children restarted after a failure, oldest first ("uart0: cause"; the last 100)</param>
    /// <param name="Vm">the VM's name</param>
    /// <param name="Phase">where the VM is in its life</param>
    /// <param name="Vcpus">its number of vcpus</param>
    /// <param name="Outcome">how it ended; null while it runs</param>
    /// <param name="Migration">the last migration of the VM, to or from here, as `ctl migrate` reported it; null if none</param>
    public sealed record Status(string Vm, Phase Phase, int Vcpus, Outcome? Outcome, string[]? Devices = null, string[]? Restarts = null,
        string? Migration = null) : IVmMessage;

    /// <summary>The VM's last migration (`ctl stats` shows it): how it went, in one line.</summary>
    public sealed record RecordMigration(string Report) : IVmMessage;

    public enum Phase { Created, Running, Paused, Ending, Ended }

    public enum OutcomeKind
    {
        /// <summary>Every started vcpu halted with interrupts disabled: the guest is done.</summary>
        Halted,
        /// <summary>The guest wrote the debug-exit port.</summary>
        DebugExit,
        /// <summary>The guest asked for a reset (i8042 command 0xFE, port 0x92 bit 0, port 0xCF9 RST_CPU).</summary>
        Reset,
        /// <summary>A vcpu triple-faulted.</summary>
        TripleFault,
        /// <summary>A vcpu could not go on (internal error, failed entry, unhandled exit).</summary>
        VcpuError,
        /// <summary>Stopped from outside.</summary>
        Stopped,
        /// <summary>The guest turned the machine off: ACPI S5 (SLP_EN with the \_S5 SLP_TYP in PM1a_CNT).</summary>
        PowerOff,
    }

    /// <summary>How the VM ended; <see cref="ExitCode"/> is what `actorvmm run` exits with.</summary>
    public sealed record Outcome(OutcomeKind Kind, int ExitCode, string Detail)
    {
        // Even codes (debug-exit statuses are always odd): see README "Exit codes". A guest that
        // powers itself off ended as normally as one that halted: both are 0.
        public const int HaltedCode = 0;
        public const int PowerOffCode = 0;
        public const int HostErrorCode = 2;
        public const int VcpuErrorCode = 4;
        public const int TripleFaultCode = 6;
        public const int ResetCode = 8;
        public const int StoppedCode = 130;
    }
}
