using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>
/// What the host's transparent-huge-page settings allow for shmem, which backs memfds (the
/// kernel's internal tmpfs mount; Documentation/admin-guide/mm/transhuge.rst, "shmem / internal
/// tmpfs"): <c>/sys/kernel/mm/transparent_hugepage/shmem_enabled</c> (always, within_size,
/// advise, never, deny, force) and, on kernels with multi-size THP, the PMD-size knob
/// <c>hugepages-2048kB/shmem_enabled</c> (always, inherit, within_size, advise, never), which
/// decides unless it says inherit. deny and force at the top override every size.
/// <para><see cref="Allowed"/>: a memfd mapped MAP_SHARED and advised MADV_HUGEPAGE can get
/// PMD-size pages (within_size counts: guest RAM fills its memfd). <see cref="NeedsAdvice"/>:
/// only with MADV_HUGEPAGE (advise, within_size).</para>
/// </summary>
public sealed record ShmemHugePages(string? Setting, string? PmdSetting, ulong PmdSize, bool Allowed, bool NeedsAdvice, string Reason)
{
    public const string SysfsRoot = "/sys/kernel/mm/transparent_hugepage";

    /// <summary>The host's settings now (<paramref name="root"/>: another directory laid out like sysfs, for tests).</summary>
    public static ShmemHugePages Read(string root = SysfsRoot)
    {
        var pmdSize = 2UL << 20;
        if (ReadLine(Path.Combine(root, "hpage_pmd_size")) is { } text && ulong.TryParse(text, out var size) && size > 0) pmdSize = size;
        var setting = Selected(ReadLine(Path.Combine(root, "shmem_enabled")));
        var pmd = Selected(ReadLine(Path.Combine(root, $"hugepages-{pmdSize >> 10}kB", "shmem_enabled")));
        return Decide(setting, pmd, pmdSize);
    }

    /// <summary>The rules of transhuge.rst for the internal mount, for one PMD size.</summary>
    public static ShmemHugePages Decide(string? setting, string? pmdSetting, ulong pmdSize = 2UL << 20)
    {
        var where = $"shmem_enabled = {setting ?? "(none)"}" + (pmdSetting is null ? "" : $", hugepages-{pmdSize >> 10}kB/shmem_enabled = {pmdSetting}");
        if (setting is null)
            return new(null, pmdSetting, pmdSize, false, false, "this kernel has no shmem transparent huge pages (no shmem_enabled)");
        var effective = setting switch
        {
            "deny" => "never",
            "force" => "always",
            _ when pmdSetting is null or "inherit" => setting,
            _ => pmdSetting switch { "deny" => "never", "force" => "always", var s => s },
        };
        return effective switch
        {
            "always" => new(setting, pmdSetting, pmdSize, true, false, $"{where}: memfds get {pmdSize >> 20} MiB pages"),
            "within_size" or "advise" => new(setting, pmdSetting, pmdSize, true, true, $"{where}: memfds get {pmdSize >> 20} MiB pages where advised (MADV_HUGEPAGE)"),
            "never" => new(setting, pmdSetting, pmdSize, false, false, $"{where}: the host gives memfds no {pmdSize >> 20} MiB pages"),
            _ => new(setting, pmdSetting, pmdSize, false, false, $"{where}: setting not understood"),
        };
    }

    /// <summary>"always [advise] never" → "advise"; a file with one word → that word.</summary>
    private static string? Selected(string? line)
    {
        if (line is null) return null;
        var open = line.IndexOf('[');
        var close = line.IndexOf(']');
        if (open >= 0 && close > open) return line[(open + 1)..close];
        var words = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        return words.Length == 1 ? words[0] : null;
    }

    private static string? ReadLine(string path)
    {
        try { return File.Exists(path) ? File.ReadAllText(path).Trim() : null; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return null; }
    }
}

/// <summary>
/// Which parts of a mapping the host maps with PMD-size pages (a transparent huge page mapped by one
/// page-directory entry: what lets KVM use a 2 MiB EPT/NPT entry), from the PAGEMAP_SCAN ioctl on
/// /proc/self/pagemap (Linux 6.7+; Documentation/admin-guide/mm/pagemap.rst): the regions whose
/// categories include PAGE_IS_HUGE. A huge folio mapped by 4 KiB PTEs does not count.
/// </summary>
public static unsafe class HugeMappings
{
    // include/uapi/linux/fs.h: _IOWR('f', 16, struct pm_scan_arg) with the 96-byte struct (printed by gcc: 0xC0606610).
    private const nuint PAGEMAP_SCAN = 0xC0606610;
    private const ulong PAGE_IS_PRESENT = 1 << 3;
    private const ulong PAGE_IS_HUGE = 1 << 6;
    private const int RegionBatch = 256;

    [StructLayout(LayoutKind.Sequential)]
    private struct PageRegion { public ulong Start, End, Categories; }                       // 24

    [StructLayout(LayoutKind.Sequential)]
    private struct PmScanArg
    {
        public ulong Size, Flags, Start, End, WalkEnd, Vec, VecLen, MaxPages;
        public ulong CategoryInverted, CategoryMask, CategoryAnyofMask, ReturnMask;         // 96
    }

    /// <summary>
    /// The huge-mapped runs of [<paramref name="start"/>, +<paramref name="length"/>) as offsets from
    /// <paramref name="start"/>, in order; false with <paramref name="error"/> if the kernel cannot
    /// say (no PAGEMAP_SCAN).
    /// </summary>
    public static bool TryScan(nint start, ulong length, out List<(ulong Offset, ulong Length)> runs, out string? error)
    {
        runs = [];
        error = null;
        if (sizeof(PmScanArg) != 96 || sizeof(PageRegion) != 24) throw new InvalidOperationException("pm_scan_arg layout");
        var fd = Native.Open("/proc/self/pagemap", Native.O_RDONLY | Native.O_CLOEXEC);
        if (fd < 0)
        {
            error = $"open(/proc/self/pagemap): {Native.ErrorText(Marshal.GetLastPInvokeError())}";
            return false;
        }
        try
        {
            // SAFETY: RegionBatch page_region records on this frame; PAGEMAP_SCAN is told VecLen =
            // RegionBatch and writes no more.
            var regions = stackalloc PageRegion[RegionBatch];
            var end = (ulong)start + length;
            var at = (ulong)start;
            while (at < end)
            {
                var arg = new PmScanArg
                {
                    Size = (ulong)sizeof(PmScanArg), Start = at, End = end, Vec = (ulong)regions, VecLen = RegionBatch,
                    CategoryMask = PAGE_IS_HUGE | PAGE_IS_PRESENT, ReturnMask = PAGE_IS_HUGE,
                };
                // SAFETY: arg and regions are locals that outlive the call; the kernel writes at most
                // VecLen regions and arg.WalkEnd.
                var n = Native.Ioctl(fd, PAGEMAP_SCAN, &arg);
                if (n < 0)
                {
                    var errno = Marshal.GetLastPInvokeError();
                    error = $"PAGEMAP_SCAN: {Native.ErrorText(errno)} (errno {errno}; Linux 6.7 or later has it)";
                    return false;
                }
                for (var i = 0; i < n; i++)
                {
                    var r = regions[i];
                    var offset = r.Start - (ulong)start;
                    var len = r.End - r.Start;
                    if (runs.Count > 0 && runs[^1].Offset + runs[^1].Length == offset) runs[^1] = (runs[^1].Offset, runs[^1].Length + len);
                    else runs.Add((offset, len));
                }
                if (arg.WalkEnd <= at) break; // no progress: nothing more to learn
                at = arg.WalkEnd;
            }
            return true;
        }
        finally
        {
            Native.Close(fd);
        }
    }
}
