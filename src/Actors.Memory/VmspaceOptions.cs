namespace ActorVmm.Memory;

/// <summary>
/// How a vmspace pages its guest memory.
/// <para><see cref="Userfaultfd"/>: register guest RAM's guest view with userfaultfd
/// (MISSING|WP|MINOR as the kernel supports) and resolve nested page faults in the actor; off, the
/// vmspace only serves reads and writes (the first version's behaviour).</para>
/// <para><see cref="SwapFile"/>: a real file for swapped-out pages (created, and deleted when the
/// vmspace stops); needed by <c>SwapOut</c>, by <see cref="ResidentLimitBytes"/> and by the swapper.</para>
/// <para><see cref="ResidentLimitBytes"/> (0 = none): a fault that would go above it first makes
/// room (direct reclaim: the clock swaps out pages not accessed for <see cref="ColdScans"/> sweeps).</para>
/// <para><see cref="ScanInterval"/> (zero = no swapper): with a swap file, a swapper actor scans
/// the accessed bits this often, swaps out pages not accessed for <see cref="ColdScans"/> scans, and
/// keeps residency below 7/8 of the limit with the least recently accessed pages.</para>
/// <para>Without userfaultfd, swap file, resident limit and swapper are ignored, and the pmap (built
/// on first use, not to cost 8 bytes per page to a VM that never asks) only follows the memfd's
/// residency (and, where the host backs guest RAM with huge pages, which runs are superpages).</para>
/// <para><see cref="DirtyTracking"/>: where the A/D API's "dirty" comes from. uffd-wp needs
/// userfaultfd; dirty-log and dirty-ring work with or without it (the VM builder then logs guest
/// RAM's memslots and enables KVM's manual dirty-log protection or the dirty rings before the
/// vcpus exist). With them, userfaultfd registers no write-protect mode (no double tracking).</para>
/// </summary>
public sealed record VmspaceOptions(
    bool Userfaultfd = false,
    PmapType PmapType = PmapType.Ept,
    string? SwapFile = null,
    ulong ResidentLimitBytes = 0,
    int ColdScans = 2,
    TimeSpan ScanInterval = default)
{
    public DirtyTracking DirtyTracking { get; init; } = DirtyTracking.UffdWp;

    /// <summary>Start from a memory file saved by <see cref="VmspaceProtocol.SaveMemory"/> instead of
    /// empty RAM (lazy or eager: see <see cref="MemoryRestore"/>). Null: a fresh VM.</summary>
    public MemoryRestore? Restore { get; init; }

    /// <summary>Entries of each vcpu's dirty ring (dirty-ring only): a power of two, at least 256.</summary>
    public uint DirtyRingEntries { get; init; } = DefaultDirtyRingEntries;

    /// <summary>4096 entries (64 KiB per vcpu), the size the kernel's documentation recommends at least.</summary>
    public const uint DefaultDirtyRingEntries = 4096;

    public static readonly VmspaceOptions Unpaged = new();

    public static VmspaceOptions Paged(string? swapFile = null, ulong residentLimitBytes = 0, int coldScans = 2,
        TimeSpan scanInterval = default) =>
        new(Userfaultfd: true, SwapFile: swapFile, ResidentLimitBytes: residentLimitBytes, ColdScans: coldScans, ScanInterval: scanInterval);
}
