using Akka.Actor;
using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>
/// The guest's vmspace. It owns the memory map (memfd segments registered as KVM memslots) and
/// serves bounds-checked reads and writes of guest memory to devices and tools. With userfaultfd
/// (see <see cref="VmspaceOptions"/>) it also demand-pages guest RAM: nested page faults, the
/// pmap with emulated accessed/dirty bits, swap, gpa holds and the EPT-generation barrier.
/// </summary>
public static class VmspaceProtocol
{
    public interface IVmspaceMessage;

    /// <summary>Reads guest memory; answered with <see cref="MemoryData"/> or <see cref="MemoryFault"/>.</summary>
    public sealed record ReadMemory(long Id, ulong Address, int Length) : IVmspaceMessage;

    public sealed record MemoryData(long Id, ulong Address, byte[] Data) : IVmspaceMessage;

    /// <summary>Writes guest memory; answered with <see cref="MemoryWritten"/> or <see cref="MemoryFault"/>.</summary>
    public sealed record WriteMemory(long Id, ulong Address, byte[] Data) : IVmspaceMessage;

    public sealed record MemoryWritten(long Id) : IVmspaceMessage;

    public sealed record MemoryFault(long Id, ulong Address, int Length, string Reason) : IVmspaceMessage;

    public sealed record GetLayout : IVmspaceMessage { public static readonly GetLayout Instance = new(); }

    public sealed record Segment(string Name, ulong Base, ulong Size, bool ReadOnly);

    public sealed record Layout(IReadOnlyList<Segment> Segments) : IVmspaceMessage;

    /// <summary>Answered with <see cref="Ready"/> once the vmspace serves guest memory; with demand
    /// paging, guest RAM is registered with userfaultfd by then, so no guest touch after the answer
    /// goes unseen. (A vmspace registers before it handles its first message.) With a restore
    /// (<see cref="VmspaceOptions.Restore"/>), Ready also means the restore is in place (eager: all
    /// copied; lazy: registered); a restore that failed (wrong file length, unreadable file) is
    /// answered with <see cref="VmspaceFailed"/> instead: the VM must not run.</summary>
    public sealed record AwaitReady : IVmspaceMessage { public static readonly AwaitReady Instance = new(); }

    public sealed record Ready : IVmspaceMessage { public static readonly Ready Instance = new(); }

    public sealed record GetStats : IVmspaceMessage { public static readonly GetStats Instance = new(); }

    /// <summary>Memory counters. Resident is what the host has actually allocated for guest RAM.
    /// <see cref="Paging"/> has the demand-paging counters (all zero without userfaultfd).</summary>
    public sealed record Stats(ulong GuestBytes, ulong ResidentBytes, long Reads, long Writes, long Faults) : IVmspaceMessage
    {
        public PagingStats Paging { get; init; } = PagingStats.Off;

        /// <summary>Bytes of guest memory locked into RAM (mlock) because the VM has a passthru-style
        /// device; 0 when not wired. Wired memory is never demand-paged or swapped.</summary>
        public ulong WiredBytes { get; init; }

        /// <summary>Guest RAM pages whose hypervisor mapping a device dropped (pc-testdev's flush port);
        /// flushes of addresses outside guest RAM are not counted.</summary>
        public long FlushedPages { get; init; }

        public DirtyStats Dirty { get; init; } = DirtyStats.None;

        /// <summary>The restore from a memory file (<see cref="RestoreStats.None"/> without one).</summary>
        public RestoreStats Restore { get; init; } = RestoreStats.None;
    }

    /// <summary>
    /// A restore from a memory file: <see cref="Mode"/> "none", "eager", "lazy" (demand paging brings
    /// the pages in) or "lazy-restore-only" (userfaultfd only for the restore; "lazy-complete" once
    /// every page is in and it is closed); RAM pages with data in the file; pages brought in from it so
    /// far (by guest faults, host accesses, or all at once when eager); pages still only in the file.
    /// Read-only memory (firmware) is copied at once and not counted.
    /// </summary>
    public sealed record RestoreStats(string Mode, ulong ImagePages, long RestoredPages, ulong PendingPages)
    {
        public static readonly RestoreStats None = new("none", 0, 0, 0);
    }

    // ---- snapshots ----------------------------------------------------------------------

    /// <summary>
    /// Saves guest memory, sent while every vcpu is paused; answered with <see cref="MemorySaved"/>.
    /// Writes a sparse memory file at <paramref name="Path"/> (format: <see cref="MemoryImage"/>; length
    /// <see cref="MemoryImage.Length"/>): every RAM page with contents (resident, swapped out, or of a
    /// lazy restore not yet brought in) and the firmware; untouched pages stay holes. Written to
    /// Path + ".tmp", flushed (fsync) and renamed, so Path is whole or absent (and Path may be the file
    /// this vmspace restored from). With <paramref name="AccessedDirtyPath"/> and demand paging on, the
    /// pmap's per-page A/D goes there too (<see cref="MemoryImage.ReadAccessedDirty"/>); without paging
    /// there is no pmap A/D and no file is written (<see cref="MemorySaved.AccessedDirtyPath"/> null).
    /// </summary>
    public sealed record SaveMemory(long Id, string Path, string? AccessedDirtyPath = null) : IVmspaceMessage
    {
        /// <summary>
        /// With writes tracked (<see cref="TrackWrites"/>): write only the RAM pages written since the
        /// previous save (each, zero or not, at its place), into the existing memory file
        /// <see cref="From"/> (Path if null), which then becomes Path; <see cref="MemorySaved.Written"/>
        /// lists them. Without it, a save while writes are tracked starts a new round: every page written
        /// before it is in the file.
        /// </summary>
        public bool WrittenOnly { get; init; }

        /// <summary>The memory file a <see cref="WrittenOnly"/> save completes (a whole file of an earlier save).</summary>
        public string? From { get; init; }

        /// <summary>The write log (<see cref="TrackWrites"/>) this save reads (<see cref="WrittenOnly"/>) or, a
        /// whole save, starts over; null: none.</summary>
        public string? Log { get; init; }
    }

    /// <summary>The write logs' names (<see cref="TrackWrites"/>): each copier of memory has its own.</summary>
    public static class WriteLogs
    {
        public const string Migration = "migration";
        public const string Checkpoint = "checkpoint";
    }

    /// <param name="Id">the <see cref="SaveMemory"/> this answers</param>
    /// <param name="Pages">4 KiB pages of contents written (RAM and firmware)</param>
    /// <param name="Bytes">the memory file's length (its allocated size is about <paramref name="Pages"/> × 4 KiB)</param>
    /// <param name="Error">null on success; else why nothing was saved (no file is left at Path)</param>
    public sealed record MemorySaved(long Id, long Pages, long Bytes, string? Error) : IVmspaceMessage
    {
        /// <summary>Where the A/D file was written; null if none was (not asked, or no demand paging).</summary>
        public string? AccessedDirtyPath { get; init; }

        /// <summary>For a <see cref="SaveMemory.WrittenOnly"/> save: the RAM pages it wrote, ascending.</summary>
        public ulong[]? Written { get; init; }
    }

    /// <summary>
    /// Starts (<paramref name="On"/>; again: empty) or stops write log <paramref name="Log"/> (a name of
    /// <see cref="WriteLogs"/>), which tracks every write to guest RAM for a copier of memory (a
    /// migration's pre-copy rounds, checkpoints): the guest's through KVM's dirty log (turned on for
    /// the RAM memslots while the VM runs, as long as any log is on), the host's through the memory's
    /// write log, and pages held by devices, which may be written at any time. Each log has the pages
    /// written since its own last save. Answered <see cref="WritesTracked"/>. A VM whose own dirty
    /// tracking already uses KVM's log (dirty-log, dirty-ring) cannot: the error says so.
    /// </summary>
    public sealed record TrackWrites(long Id, bool On, string Log = WriteLogs.Migration) : IVmspaceMessage;

    /// <param name="Error">null if done; else why writes cannot be tracked (nothing changed)</param>
    public sealed record WritesTracked(long Id, string? Error) : IVmspaceMessage;

    /// <summary>Where the A/D API's dirty bit comes from (uffd-wp, dirty-log, dirty-ring) and, with
    /// dirty rings, what the vcpus harvested: harvests at the EPT barrier, harvests forced by a full
    /// ring, the GFNs they carried, and harvests that found a ring full to its last entry (KVM may
    /// have lost writes: every guest RAM page was then reported dirty).</summary>
    public sealed record DirtyStats(string Tracking, long BarrierHarvests, long RingFullHarvests, long HarvestedGfns, long RingOverflows = 0)
    {
        public static readonly DirtyStats None = new("uffd-wp", 0, 0, 0);
    }

    /// <summary>
    /// Demand-paging counters: pages by state as the pmap has them (<see cref="AccessedPages"/>: A
    /// set, i.e. mapped in the guest view since the last clear; <see cref="DirtyPages"/>: M set,
    /// written since the last clear, swapped pages included); faults by kind as the kernel reported
    /// them; how they were resolved (zero fills, swap-ins); swap-outs; <see cref="Retries"/> = fills
    /// that found the kernel's state different (a race: woken to fault again). Pages are 4 KiB guest
    /// RAM pages.
    /// </summary>
    public sealed record PagingStats(
        bool Enabled, string Features, ulong RamPages, ulong ResidentPages, ulong SwappedPages, ulong HeldPages,
        ulong AccessedPages, ulong DirtyPages,
        long MissingFaults, long MinorFaults, long WriteProtectFaults, long ZeroFills, long SwapIns, long SwapOuts,
        long Retries, long Reclaims, ulong EptGeneration, string? Failure)
    {
        public static readonly PagingStats Off = new(false, "userfaultfd off", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, null);

        /// <summary>The most pages resident at once so far, and the limit (0 = none).</summary>
        public ulong PeakResidentPages { get; init; }
        public ulong ResidentLimitPages { get; init; }

        /// <summary>The swapper: its scan interval (zero = no swapper), the A-bit scans the vmspace
        /// served it, and the pages it swapped out for it.</summary>
        public TimeSpan ScanInterval { get; init; }
        public long AccessedScans { get; init; }
        public long ScanPageOuts { get; init; }

        /// <summary>Superpages: what the host allows and the vmspace does, and the pages the host
        /// backs with huge pages.</summary>
        public string Superpages { get; init; } = "";
        public ulong SuperpagePages { get; init; }
    }

    // ---- nested page faults -------------------------------------------------------------

    /// <summary>From the userfaultfd reader thread: a vcpu (or any thread) touched guest RAM at
    /// <paramref name="Gpa"/> and waits in the kernel until the vmspace resolves it.</summary>
    public sealed record NestedPageFault(ulong Gpa, FaultKind Kind, bool Write) : IVmspaceMessage;

    /// <summary>To the events actor given at creation: paging failed (a userfaultfd or swap error);
    /// the vmspace has stopped paging (memory stays readable) and the VM should stop.</summary>
    public sealed record VmspaceFailed(string Reason) : IVmspaceMessage;

    /// <summary>A request the vmspace cannot serve (paging off or failed, range not guest RAM, no swap file).</summary>
    public sealed record Refused(long Id, string Reason) : IVmspaceMessage;

    // ---- accessed / dirty ---------------------------------------------------------------

    /// <summary>Clears A over a RAM range: the guest view's mappings go, the next touch is a MINOR
    /// fault. Answered with <see cref="AccessedCleared"/> after the EPT barrier.</summary>
    public sealed record ClearAccessed(long Id, ulong Gpa, ulong Length) : IVmspaceMessage;

    public sealed record AccessedCleared(long Id, ulong Generation) : IVmspaceMessage;

    /// <summary>Clears D over a RAM range (held pages stay dirty) so that the next write sets it: uffd-wp
    /// write-protects the guest view (the next write is a WP fault), dirty-log clears KVM's log
    /// (KVM_CLEAR_DIRTY_LOG re-protects), dirty-ring forgets what the vcpus report for the range up to
    /// their acks. Answered with <see cref="DirtyCleared"/> after the EPT barrier.</summary>
    public sealed record ClearDirty(long Id, ulong Gpa, ulong Length) : IVmspaceMessage;

    public sealed record DirtyCleared(long Id, ulong Generation) : IVmspaceMessage;

    /// <summary>Per-page A/D of a RAM range; answered with <see cref="AccessedDirty"/>. A comes from the
    /// pmap; D from the vmspace's dirty tracking (<see cref="VmspaceOptions.DirtyTracking"/>): the pmap's
    /// M (uffd-wp), KVM's dirty log, or the dirty rings (harvested first through the EPT barrier, so the
    /// answer comes after every vcpu acked). Held pages and pages the host wrote are dirty in all.</summary>
    public sealed record ScanAccessedDirty(long Id, ulong Gpa, ulong Length) : IVmspaceMessage;

    /// <summary><paramref name="Pages"/>[i] is the page at <paramref name="Gpa"/> (rounded down) + i × 4 KiB.</summary>
    public sealed record AccessedDirty(long Id, ulong Gpa, PageAD[] Pages) : IVmspaceMessage;

    /// <summary>The raw pmap entries of a RAM range; answered with <see cref="PmapEntries"/>.</summary>
    public sealed record GetPmap(long Id, ulong Gpa, ulong Length) : IVmspaceMessage;

    public sealed record PmapEntries(long Id, ulong Gpa, PmapType Type, PmapFlags Flags, ulong[] Entries) : IVmspaceMessage
    {
        /// <summary>The bit layout of <see cref="Entries"/> (a method: computed, not sent).</summary>
        public PmapBits Bits() => PmapBits.For(Type, Flags);
    }

    // ---- the swapper ---------------------------------------------------------------------

    /// <summary>From the swapper: one A-bit scan of all guest RAM (<see cref="PageSample"/> per
    /// page: resident, accessed since the last scan, held), after which A is clear on every resident,
    /// unheld page. Answered with <see cref="AccessedSample"/> after the EPT barrier, or <see cref="Refused"/>.</summary>
    public sealed record SampleAccessed(long Id) : IVmspaceMessage;

    /// <param name="Id">the <see cref="SampleAccessed"/> this answers</param>
    /// <param name="Pages">[i] is RAM page i (guest RAM numbered in guest-physical order)</param>
    /// <param name="ResidentPages">pages resident now</param>
    /// <param name="TargetResidentPages">what the swapper should keep residency below (0 = no limit)</param>
    /// <param name="Generation">the EPT generation every vcpu acknowledged before this answer: from it on, no vcpu uses a mapping whose A bit the scan cleared</param>
    public sealed record AccessedSample(long Id, PageSample[] Pages, ulong ResidentPages, ulong TargetResidentPages, ulong Generation)
        : IVmspaceMessage;

    /// <summary>From the swapper: swap out these RAM pages if they are still resident, unheld and
    /// not accessed since the last <see cref="SampleAccessed"/>. Answered with <see cref="PagedOut"/>
    /// after the EPT barrier, or <see cref="Refused"/>.</summary>
    public sealed record PageOut(long Id, ulong[] Pages) : IVmspaceMessage;

    public sealed record PagedOut(long Id, int Pages, ulong Generation) : IVmspaceMessage;

    // ---- swap and holds -----------------------------------------------------------------

    /// <summary>Swaps out the resident, unheld pages of a RAM range; answered with <see cref="SwappedOut"/>
    /// after the EPT barrier.</summary>
    public sealed record SwapOut(long Id, ulong Gpa, ulong Length) : IVmspaceMessage;

    public sealed record SwappedOut(long Id, int Pages, ulong Generation) : IVmspaceMessage;

    /// <summary>vm_gpa_hold: pins a RAM range for host-side access (resident, never swapped or
    /// write-protected, counted dirty) until released or the holder (the sender) stops. Answered
    /// with <see cref="HoldGranted"/> or <see cref="Refused"/>; refused from Ask's temporary
    /// sender, which stops with the answer.</summary>
    public sealed record Hold(long Id, ulong Gpa, ulong Length) : IVmspaceMessage;

    /// <summary>A lease on guest pages; give <see cref="HoldId"/> back with <see cref="Release"/>.</summary>
    public sealed record GpaHold(long HoldId, ulong Gpa, ulong Length);

    public sealed record HoldGranted(long Id, GpaHold Hold) : IVmspaceMessage;

    /// <summary>vm_gpa_release; answered with <see cref="HoldReleased"/> (or <see cref="Refused"/> for an unknown id).</summary>
    public sealed record Release(long HoldId) : IVmspaceMessage;

    public sealed record HoldReleased(long HoldId) : IVmspaceMessage;

    /// <summary>Releases every hold of the sender (a device restarting); answered with <see cref="HoldReleased"/> per hold.</summary>
    public sealed record ReleaseAllHolds : IVmspaceMessage { public static readonly ReleaseAllHolds Instance = new(); }

    // ---- EPT generation and invalidation ------------------------------------------------

    /// <summary>A vcpu joins the invalidation barrier: every later generation waits for its ack,
    /// whatever state it is in (out of the guest, it acks as soon as the request arrives).</summary>
    public sealed record RegisterVcpu(int VcpuId, IActorRef Vcpu) : IVmspaceMessage;

    public sealed record UnregisterVcpu(int VcpuId) : IVmspaceMessage;

    /// <summary>To every registered vcpu (one in the guest is kicked): on its next entry it does its per-vcpu
    /// work (e.g. harvest its dirty ring) and answers <see cref="EptInvalidated"/>.</summary>
    public sealed record InvalidateEpt(ulong Generation) : IVmspaceMessage, Devices.IVcpuNotify;

    /// <summary>A vcpu's ack of <paramref name="Generation"/>, with what it harvested from its dirty ring
    /// just before (guest frame numbers; null or empty without a ring). <paramref name="RingOverflowed"/>:
    /// the ring was found full, so KVM may have lost some of the vcpu's writes.</summary>
    public sealed record EptInvalidated(int VcpuId, ulong Generation, ulong[]? DirtyGfns = null, bool RingOverflowed = false) : IVmspaceMessage;

    /// <summary>From a vcpu whose dirty ring filled (KVM_EXIT_DIRTY_RING_FULL): what it harvested before
    /// it went on running (guest frame numbers), and whether the ring was full to the last entry.</summary>
    public sealed record DirtyRingHarvested(int VcpuId, ulong[] Gfns, bool RingOverflowed = false) : IVmspaceMessage;

    /// <summary>Bumps the generation and waits for every vcpu; answered with <see cref="EptSynced"/>.</summary>
    public sealed record SyncEpt(long Id) : IVmspaceMessage;

    public sealed record EptSynced(long Id, ulong Generation) : IVmspaceMessage;

    /// <summary>Largest single read or write a message may carry.</summary>
    public const int MaxTransfer = 1 << 20;

    /// <summary>A vmspace without demand paging (no userfaultfd).</summary>
    public static Props Props(GuestMemoryMap memory, VmHandle? kvm = null) =>
        Akka.Actor.Props.Create(() => new VmspaceActor(memory, VmspaceOptions.Unpaged, ActorRefs.Nobody, null, kvm));

    /// <summary>A vmspace paging as <paramref name="options"/> say; <see cref="VmspaceFailed"/> goes to
    /// <paramref name="events"/>. The caller keeps <paramref name="memory"/> alive until the actor stopped.
    /// <paramref name="dirtyLog"/> is the VM's KVM dirty log, needed for <see cref="DirtyTracking.DirtyLog"/>
    /// (RAM memslots numbered as <see cref="GuestMemoryMap.RegisterWith"/> does); <paramref name="kvm"/>,
    /// the VM whose memslots these are, for <see cref="TrackWrites"/>.</summary>
    public static Props Props(GuestMemoryMap memory, VmspaceOptions options, IActorRef events, IDirtyLog? dirtyLog = null, VmHandle? kvm = null) =>
        Akka.Actor.Props.Create(() => new VmspaceActor(memory, options, events, dirtyLog, kvm));
}
