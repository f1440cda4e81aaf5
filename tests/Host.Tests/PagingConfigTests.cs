using ActorVmm.Host.Config;
using Akka.Configuration;
using ActorVmm.Memory;
using Xunit;

namespace ActorVmm.Host.Tests;

public sealed class PagingConfigTests
{
    private static VmConfig Parse(string hocon) =>
        VmConfig.From(ConfigurationFactory.ParseString(hocon).WithFallback(VmConfig.Load(null)));

    [Fact]
    public void Paging_is_off_by_default_and_on_when_asked_with_its_limit_and_swap_file()
    {
        Assert.Null(Parse("").Paging);
        var p = Parse("actorvmm.vm.paging { enabled = on, resident-limit = 8M, swap-file = \"/tmp/x.swap\" }").Paging!;
        Assert.True(p.Userfaultfd);
        Assert.Equal(8UL << 20, p.ResidentLimitBytes);
        Assert.Equal("/tmp/x.swap", p.SwapFile);
    }

    [Fact]
    public void A_resident_limit_without_a_swap_file_is_refused_by_name()
    {
        var e = Assert.Throws<ConfigException>(() => Parse("actorvmm.vm.paging { enabled = on, resident-limit = 8M }"));
        Assert.Contains("swap-file", e.Message);
        Assert.Contains("resident-limit", Assert.Throws<ConfigException>(() =>
            Parse("actorvmm.vm.paging { enabled = on, resident-limit = 8Q, swap-file = s }")).Message);
    }

    [Fact]
    public void The_swapper_scans_every_second_by_default_with_a_swap_file_and_not_without_one()
    {
        var p = Parse("actorvmm.vm.paging { enabled = on, swap-file = s }").Paging!;
        Assert.Equal((TimeSpan.FromSeconds(1), 2), (p.ScanInterval, p.ColdScans));
        p = Parse("actorvmm.vm.paging { enabled = on, swap-file = s, scan-interval = 250ms, cold-scans = 4 }").Paging!;
        Assert.Equal((TimeSpan.FromMilliseconds(250), 4), (p.ScanInterval, p.ColdScans));
        Assert.Equal(TimeSpan.Zero, Parse("actorvmm.vm.paging { enabled = on, swap-file = s, scan-interval = 0 }").Paging!.ScanInterval);
        Assert.Equal(TimeSpan.Zero, Parse("actorvmm.vm.paging { enabled = on }").Paging!.ScanInterval); // nowhere to swap to
    }

    [Theory]
    [InlineData("scan-interval = -1s", "scan-interval")]
    [InlineData("scan-interval = soon", "scan-interval")]
    [InlineData("scan-interval = 2d", "scan-interval")]
    [InlineData("cold-scans = 0", "cold-scans")]
    [InlineData("cold-scans = 300", "cold-scans")]
    public void Bad_swapper_settings_are_refused_by_name(string setting, string key)
    {
        var e = Assert.Throws<ConfigException>(() => Parse($"actorvmm.vm.paging {{ enabled = on, swap-file = s, {setting} }}"));
        Assert.Contains(key, e.Message);
    }

    [Fact]
    public void Superpages_are_on_by_default_and_can_be_turned_off()
    {
        Assert.True(Parse("").Superpages);
        Assert.False(Parse("actorvmm.vm.paging.superpages = off").Superpages);
    }

    [Theory]
    [InlineData("uffd-wp", false, null)]
    [InlineData("dirty-log", false, DirtyTracking.DirtyLog)]
    [InlineData("dirty-ring", false, DirtyTracking.DirtyRing)]
    [InlineData("dirty-ring", true, DirtyTracking.DirtyRing)]
    [InlineData("dirty-log", true, DirtyTracking.DirtyLog)]
    public void Dirty_tracking_is_chosen_by_name_and_KVM_sources_need_no_userfaultfd(string name, bool paging, DirtyTracking? expected)
    {
        var p = Parse($"actorvmm.vm.paging {{ enabled = {(paging ? "on" : "off")}, dirty-tracking = {name}, dirty-ring-entries = 512 }}").Paging;
        if (expected is null && !paging)
        {
            Assert.Null(p); // uffd-wp without paging: nothing to configure
            return;
        }
        Assert.NotNull(p);
        Assert.Equal(expected, p.DirtyTracking);
        Assert.Equal(paging, p.Userfaultfd);
        Assert.Equal(512u, p.DirtyRingEntries);
    }

    [Theory]
    [InlineData("dirty-tracking = dirty-bitmap", "uffd-wp, dirty-log or dirty-ring")]
    [InlineData("dirty-ring-entries = 1000", "power of two of at least 256")]
    [InlineData("dirty-ring-entries = 128", "power of two of at least 256")]
    [InlineData("dirty-ring-entries = lots", "dirty-ring-entries")]
    public void A_bad_dirty_tracking_setting_is_refused_by_name(string setting, string reason)
    {
        var e = Assert.Throws<ConfigException>(() => Parse($"actorvmm.vm.paging {{ {setting} }}"));
        Assert.Contains(reason, e.Message);
    }

    [Fact]
    public void A_shared_memory_device_is_read_with_its_file_and_size()
    {
        Assert.Null(Parse("").SharedMemory);
        Assert.Equal(new ActorVmm.Host.Vm.SharedMemorySpec("/dev/shm/x", 64UL << 10),
            Parse("actorvmm.vm.shm { file = \"/dev/shm/x\", size = 64K }").SharedMemory);
        Assert.Equal(new ActorVmm.Host.Vm.SharedMemorySpec("f", null), Parse("actorvmm.vm.shm.file = f").SharedMemory);
    }

    [Theory]
    [InlineData("shm { file = f }\n paging { enabled = on }", "paging.enabled must be off")]
    [InlineData("shm { file = f, size = 100 }", "not a multiple of 4 KiB")]
    [InlineData("shm { file = f, size = 512M }", "larger than the shared-memory window")]
    [InlineData("shm { size = 64K }", "shm.file is empty")]
    public void A_conflicting_or_bad_shared_memory_setting_is_refused_clearly(string setting, string reason)
    {
        var e = Assert.Throws<ConfigException>(() => Parse($"actorvmm.vm {{ {setting} }}"));
        Assert.Contains(reason, e.Message);
    }
}
