using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm.Tests;

/// <summary>
/// Transparent huge pages for guest RAM: what the host's shmem THP settings allow (the rules of
/// transhuge.rst, then this host's real sysfs) and which ranges the host maps with a PMD-size page
/// (PAGEMAP_SCAN). Shmem THP itself can only be seen on a host whose shmem_enabled allows it; the
/// scanner is checked on anonymous THP, which hosts commonly allow with madvise.
/// </summary>
public sealed unsafe partial class HugePagesTests
{
    private const ulong MiB = 1 << 20;

    [Theory]
    [InlineData("always", null, true, false)]
    [InlineData("always", "inherit", true, false)]
    [InlineData("advise", "inherit", true, true)]
    [InlineData("within_size", "inherit", true, true)]
    [InlineData("never", "inherit", false, false)]
    [InlineData("never", "always", true, false)]     // the PMD-size knob decides unless it inherits
    [InlineData("never", "advise", true, true)]
    [InlineData("always", "never", false, false)]
    [InlineData("deny", "always", false, false)]     // deny and force at the top override every size
    [InlineData("force", "never", true, false)]
    public void The_pmd_size_is_allowed_for_memfds_by_the_transhuge_rules(string setting, string? pmd, bool allowed, bool needsAdvice)
    {
        var d = ShmemHugePages.Decide(setting, pmd);
        Assert.Equal((allowed, needsAdvice), (d.Allowed, d.NeedsAdvice));
        Assert.Contains($"shmem_enabled = {setting}", d.Reason);
    }

    [Fact]
    public void Settings_are_read_from_sysfs_files_with_the_selected_word_in_brackets()
    {
        var root = Directory.CreateTempSubdirectory("actorvmm-thp-");
        try
        {
            File.WriteAllText(Path.Combine(root.FullName, "shmem_enabled"), "always within_size [advise] never deny force\n");
            File.WriteAllText(Path.Combine(root.FullName, "hpage_pmd_size"), "2097152\n");
            Directory.CreateDirectory(Path.Combine(root.FullName, "hugepages-2048kB"));
            File.WriteAllText(Path.Combine(root.FullName, "hugepages-2048kB", "shmem_enabled"), "always [inherit] within_size advise never\n");
            var d = ShmemHugePages.Read(root.FullName);
            Assert.Equal(("advise", "inherit", 2UL * MiB, true, true), (d.Setting, d.PmdSetting, d.PmdSize, d.Allowed, d.NeedsAdvice));

            File.Delete(Path.Combine(root.FullName, "shmem_enabled"));
            var none = ShmemHugePages.Read(root.FullName);
            Assert.False(none.Allowed);
            Assert.Contains("no shmem transparent huge pages", none.Reason);
        }
        finally { root.Delete(recursive: true); }
    }

    [Fact]
    public void This_hosts_setting_is_read_and_decided_as_the_rules_say()
    {
        var host = ShmemHugePages.Read();
        var file = Path.Combine(ShmemHugePages.SysfsRoot, "shmem_enabled");
        if (!File.Exists(file))
        {
            Assert.False(host.Allowed);
            return;
        }
        var text = File.ReadAllText(file);
        Assert.Contains($"[{host.Setting}]", text);
        Assert.Equal(ShmemHugePages.Decide(host.Setting, host.PmdSetting, host.PmdSize), host);
    }

    [Fact]
    public void Memfd_views_start_on_2_mib_boundaries()
    {
        using var r = new MemfdRegion("aligned", 6 * MiB + 4096);
        Assert.Equal(0UL, (ulong)r.GuestView % (2 * MiB));
        Assert.Equal(0UL, (ulong)r.HostView % (2 * MiB));
        r.HostSpan(6 * MiB, 4096)[100] = 7; // the whole size is mapped
        Assert.Equal(7, r.HostSpan(6 * MiB, 4096)[100]);
    }

    [Fact]
    public void An_advised_memfd_is_huge_mapped_exactly_when_the_host_allows_shmem_huge_pages()
    {
        using var r = new MemfdRegion("thp", 8 * MiB);
        r.AdviseHugePages();
        Assert.True(r.HugePagesAdvised);
        r.HostSpan(0, (int)(4 * MiB)).Fill(1); // touches the first two 2 MiB runs

        Assert.True(HugeMappings.TryScan(r.HostView, 8 * MiB, out var runs, out var error), error);
        if (ShmemHugePages.Read().Allowed)
        {
            Assert.NotEmpty(runs); // (the kernel may still fall back to 4 KiB pages under fragmentation)
            Assert.All(runs, run => Assert.True(run.Offset % (2 * MiB) == 0 && run.Offset + run.Length <= 4 * MiB, $"{run}"));
        }
        else Assert.Empty(runs);
    }

    [Fact]
    public void The_scanner_finds_anonymous_transparent_huge_pages_where_the_host_gives_them()
    {
        const ulong length = 8 * MiB;
        var reserve = Mmap(0, (nuint)(length + 2 * MiB), 3 /* RW */, 0x22 /* PRIVATE|ANONYMOUS */, -1, 0);
        Assert.NotEqual(-1, (long)reserve);
        try
        {
            var p = (nint)(((ulong)reserve + 2 * MiB - 1) & ~(2 * MiB - 1));
            Assert.Equal(0, Madvise(p, (nuint)length, 14 /* MADV_HUGEPAGE */));
            new Span<byte>((void*)p, (int)(4 * MiB)).Fill(1);          // the first two runs, whole
            new Span<byte>((void*)(p + (nint)(6 * MiB)), 1)[0] = 1;     // one byte of the fourth

            Assert.True(HugeMappings.TryScan(p, length, out var runs, out var error), error);
            var anon = File.Exists("/sys/kernel/mm/transparent_hugepage/enabled")
                ? File.ReadAllText("/sys/kernel/mm/transparent_hugepage/enabled") : "[never]";
            if (anon.Contains("[never]"))
            {
                Assert.Empty(runs);
                return;
            }
            // Every reported run is whole 2 MiB pages within what was touched; the 4 KiB-touched
            // third run is never reported, and with THP on (madvise: direct compaction) some are.
            Assert.NotEmpty(runs);
            foreach (var (offset, len) in runs)
            {
                Assert.Equal((0UL, 0UL), (offset % (2 * MiB), len % (2 * MiB)));
                Assert.True(offset + len <= 4 * MiB || offset == 6 * MiB, $"run at 0x{offset:X}+0x{len:X}");
            }
        }
        finally { Munmap(reserve, (nuint)(length + 2 * MiB)); }
    }

    [LibraryImport("libc", EntryPoint = "mmap", SetLastError = true)]
    private static partial nint Mmap(nint addr, nuint length, int prot, int flags, int fd, long offset);

    [LibraryImport("libc", EntryPoint = "munmap")]
    private static partial int Munmap(nint addr, nuint length);

    [LibraryImport("libc", EntryPoint = "madvise")]
    private static partial int Madvise(nint addr, nuint length, int advice);
}
