using System.CommandLine;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using Akka.Actor;
using Akka.Configuration;

namespace ActorVmm.Host.Tests;

/// <summary>
/// <c>--disk FILE[,ro]</c> / <c>actorvmm.vm.disk</c> and <c>--virtio-console</c> / <c>actorvmm.vm.virtio-console</c>:
/// the options as settings (absolute paths for <c>ctl run</c>), the configuration read and checked, and
/// the disk file refused by the VM builder, before anything else is made, when it cannot be the disk.
/// </summary>
public sealed class VirtioDeviceOptionsTests : IDisposable
{
    private const ulong MiB = 1 << 20;
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-disk-options-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static (Cli.VmOptions Options, ParseResult Parse) Parse(params string[] args)
    {
        var options = new Cli.VmOptions();
        var root = new RootCommand();
        options.AddTo(root);
        var parse = root.Parse(args);
        Assert.Empty(parse.Errors);
        return (options, parse);
    }

    private static Dictionary<string, string> Settings(bool absolute, params string[] args)
    {
        var (options, parse) = Parse(args);
        return options.Settings(parse, absolute).ToDictionary(kv => kv.Key, kv => kv.Value);
    }

    [Fact]
    public void Disk_becomes_the_disk_settings_with_an_absolute_path_for_a_host_process()
    {
        var run = Settings(absolute: false, "--disk", "images/d.img");
        Assert.Equal("images/d.img", run["actorvmm.vm.disk.path"]);
        Assert.Equal("off", run["actorvmm.vm.disk.read-only"]);

        var ctl = Settings(absolute: true, "--disk", "images/d.img,ro");
        Assert.Equal(Path.GetFullPath("images/d.img"), ctl["actorvmm.vm.disk.path"]);
        Assert.True(Path.IsPathRooted(ctl["actorvmm.vm.disk.path"]));
        Assert.Equal("on", ctl["actorvmm.vm.disk.read-only"]);
    }

    [Theory]
    [InlineData(",ro")]
    [InlineData("")]
    public void A_disk_option_without_a_file_is_refused(string text)
    {
        var (options, parse) = Parse("--disk", text);
        var e = Assert.Throws<ConfigException>(() => options.Settings(parse, absolute: false));
        Assert.Contains("give FILE or FILE,ro", e.Message);
    }

    [Fact]
    public void Virtio_console_becomes_its_setting_and_both_options_shape_the_machine()
    {
        Assert.Equal("on", Settings(absolute: false, "--virtio-console")["actorvmm.vm.virtio-console"]);
        Assert.DoesNotContain("actorvmm.vm.virtio-console", Settings(absolute: false).Keys);
        var (options, parse) = Parse("--disk", "d.img", "--virtio-console");
        Assert.Equal(["--disk", "--virtio-console"], options.Shaping(parse));
    }

    [Fact]
    public void The_command_line_settings_read_back_as_the_vms_disk_and_console()
    {
        var settings = Settings(absolute: true, "--disk", "d.img,ro", "--virtio-console");
        var vm = VmConfig.From(ConfigValues.From(settings).WithFallback(VmConfig.Load(null)));
        Assert.Equal(new DiskSpec(Path.GetFullPath("d.img"), ReadOnly: true), vm.Disk);
        Assert.True(vm.VirtioConsole);
    }

    [Fact]
    public void By_default_there_is_no_disk_and_no_virtio_console()
    {
        var vm = VmConfig.From(VmConfig.Load(null));
        Assert.Null(vm.Disk);
        Assert.False(vm.VirtioConsole);
    }

    [Theory]
    [InlineData("actorvmm.vm.disk { path = \"/d.img\" }", "/d.img", false)]
    [InlineData("actorvmm.vm.disk { path = \"/d.img\", read-only = on }", "/d.img", true)]
    [InlineData("actorvmm.vm.disk.path = \"/x y.img\"\nactorvmm.vm.disk.read-only = false", "/x y.img", false)]
    public void The_disk_is_read_from_hocon(string hocon, string path, bool readOnly)
    {
        var vm = VmConfig.From(ConfigurationFactory.ParseString(hocon).WithFallback(VmConfig.Load(null)));
        Assert.Equal(new DiskSpec(path, readOnly), vm.Disk);
    }

    [Theory]
    [InlineData("actorvmm.vm.disk.read-only = on", "actorvmm.vm.disk.read-only is on but actorvmm.vm.disk.path is empty")]
    [InlineData("actorvmm.vm.disk { path = \"/d.img\", read-only = maybe }", "actorvmm.vm.disk.read-only must be on or off, not \"maybe\"")]
    [InlineData("actorvmm.vm.virtio-console = 2", "actorvmm.vm.virtio-console must be on or off, not \"2\"")]
    [InlineData("actorvmm.vm { disk.path = \"/d.img\", paging.enabled = on }", "actorvmm.vm.disk: the virtio block device reads and writes guest memory itself")]
    [InlineData("actorvmm.vm { virtio-console = on, paging.enabled = on }", "actorvmm.vm.virtio-console: the virtio console reads and writes guest memory itself")]
    public void Bad_disk_and_console_settings_are_refused_naming_the_key(string hocon, string message)
    {
        var config = ConfigurationFactory.ParseString(hocon).WithFallback(VmConfig.Load(null));
        var e = Assert.Throws<ConfigException>(() => VmConfig.From(config));
        Assert.Contains(message, e.Message);
    }

    private static VmSpec Spec(DiskSpec disk) =>
        new("disk", 16 * MiB, 1, new LongModeImage([0xF4], 0x10_0000, 0x10_0000)) { Disk = disk };

    /// <summary>Refused in <see cref="VmBuilder.Start"/> before KVM is opened or an actor exists: the
    /// actor system is never asked for (a task that never completes would hang the test otherwise).</summary>
    private static VmBuildException BuildFails(VmSpec spec)
    {
        var never = new TaskCompletionSource<ActorSystem>().Task;
        return Assert.Throws<VmBuildException>(() => new VmBuilder(never, spec).Start());
    }

    [Fact]
    public void A_missing_disk_file_is_refused_before_the_vm_is_built()
    {
        var path = Path.Combine(_dir, "missing.img");
        Assert.Equal($"disk {path} does not exist", BuildFails(Spec(new DiskSpec(path))).Message);
    }

    [Fact]
    public void A_directory_is_not_a_disk()
    {
        Assert.Equal($"disk {_dir} is a directory, not a disk image", BuildFails(Spec(new DiskSpec(_dir))).Message);
    }

    [Fact]
    public void A_read_only_file_without_ro_is_refused_and_names_the_option()
    {
        var path = Path.Combine(_dir, "ro.img");
        File.WriteAllBytes(path, new byte[4096]);
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        var e = BuildFails(Spec(new DiskSpec(path)));
        Assert.Contains($"disk {path} is read-only (no write permission)", e.Message);
        Assert.Contains("--disk FILE,ro", e.Message);
    }

    [Fact]
    public void A_disk_shorter_than_a_sector_is_refused()
    {
        var path = Path.Combine(_dir, "tiny.img");
        File.WriteAllBytes(path, new byte[100]);
        Assert.Equal($"disk {path} is 100 bytes, less than one 512-byte sector", BuildFails(Spec(new DiskSpec(path, ReadOnly: true))).Message);
    }

    [Fact]
    public void A_disk_and_demand_paging_exclude_each_other_in_the_builder_too()
    {
        var path = Path.Combine(_dir, "d.img");
        File.WriteAllBytes(path, new byte[4096]);
        var spec = Spec(new DiskSpec(path)) with { Paging = ActorVmm.Memory.VmspaceOptions.Paged(null, 0, 2, TimeSpan.Zero) };
        Assert.Equal("a virtio disk reads and writes guest memory itself: demand paging (actorvmm.vm.paging.enabled) must be off",
            BuildFails(spec).Message);
        Assert.Contains("a virtio entropy device (rng), a virtio disk, a virtio console reads",
            BuildFails(spec with { Rng = true, VirtioConsole = true }).Message);
    }
}
