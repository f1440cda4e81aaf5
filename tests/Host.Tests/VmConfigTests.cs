using System.Text.RegularExpressions;
using ActorVmm.Host.Config;
using Akka.Configuration;

namespace ActorVmm.Host.Tests;

public sealed class VmConfigTests
{
    private const ulong KiB = 1 << 10, MiB = 1 << 20, GiB = 1 << 30;

    [Theory]
    [InlineData("64M", 64 * MiB)]
    [InlineData("1G", GiB)]
    [InlineData("2GiB", 2 * GiB)]
    [InlineData("2048K", 2048 * KiB)]
    [InlineData("1024KiB", MiB)]
    [InlineData("2MiB", 2 * MiB)]
    [InlineData("16m", 16 * MiB)]
    [InlineData("1048576", MiB)]
    [InlineData(" 8M ", 8 * MiB)]
    [InlineData("1024G", 1UL << 40)]
    public void ParseSize_accepts_sizes(string text, ulong bytes) =>
        Assert.Equal(bytes, VmConfig.ParseSize(text, "memory"));

    [Theory]
    [InlineData("0", "not a size")]
    [InlineData("", "not a size")]
    [InlineData("12Q", "not a size")]
    [InlineData("-1", "not a size")]
    [InlineData("1.5M", "not a size")]
    [InlineData("M", "not a size")]
    [InlineData("0x100000", "not a size")]
    [InlineData("100", "not a multiple of 4 KiB")]
    [InlineData("1048577", "not a multiple of 4 KiB")]
    [InlineData("512K", "below the minimum")]
    [InlineData("1025G", "above the maximum")]
    [InlineData("18446744073709551615G", "too large")]
    public void ParseSize_rejects_with_a_reason(string text, string reason)
    {
        var e = Assert.Throws<ConfigException>(() => VmConfig.ParseSize(text, "actorvmm.vm.memory"));
        Assert.Contains(reason, e.Message);
        Assert.StartsWith("actorvmm.vm.memory: ", e.Message);
        Assert.Contains($"\"{text}\"", e.Message);
    }

    [Fact]
    public void Every_example_the_not_a_size_message_gives_is_accepted()
    {
        var e = Assert.Throws<ConfigException>(() => VmConfig.ParseSize("12Q", "memory"));
        var examples = Regex.Match(e.Message, @"examples: ([^)]*)\)").Groups[1].Value.Split(", ");
        Assert.NotEmpty(examples);
        foreach (var example in examples) VmConfig.ParseSize(example, "memory");
    }

    [Fact]
    public void Defaults_come_from_the_embedded_default_conf()
    {
        var vm = VmConfig.From(VmConfig.Load(null));
        Assert.Equal(new VmConfig("vm0", 64 * MiB, 1, "stdout", "stdin", null, 0), vm);
    }

    [Fact]
    public void Overrides_replace_only_what_they_name()
    {
        var config = ConfigurationFactory.ParseString("""
            actorvmm.vm { name = web1, memory = 1G, cpus = 4, serial.input = none, trace = "/tmp/t.jsonl", timeout = 2.5 }
            """).WithFallback(VmConfig.Load(null));
        var vm = VmConfig.From(config);
        Assert.Equal(new VmConfig("web1", GiB, 4, "stdout", "none", "/tmp/t.jsonl", 2.5), vm);
    }

    [Fact]
    public void Command_line_values_override_as_values_and_are_taken_verbatim()
    {
        // Characters that HOCON text would read as syntax: quotes, a substitution, braces, a comment.
        const string name = "web \"1\" ${x} { y } // z";
        var config = ConfigValues.From(new Dictionary<string, string>
        {
            ["actorvmm.vm.name"] = name,
            ["actorvmm.vm.memory"] = "1G",
            ["actorvmm.vm.serial.input"] = "none",
        }).WithFallback(VmConfig.Load(null));
        var vm = VmConfig.From(config);
        Assert.Equal(name, vm.Name);
        Assert.Equal(GiB, vm.MemoryBytes);
        Assert.Equal("none", vm.SerialInput);
        Assert.Equal("stdout", vm.SerialOutput); // a sibling of serial.input, from the defaults
    }

    [Fact]
    public void A_vm_file_is_layered_over_the_defaults()
    {
        using var dir = new TempDir();
        var file = dir.Write("vm.conf", "actorvmm.vm { name = from-file\n cpus = 2\n serial.output = \"/tmp/console.txt\" }\n");
        var vm = VmConfig.From(VmConfig.Load(file));
        Assert.Equal(new VmConfig("from-file", 64 * MiB, 2, "/tmp/console.txt", "stdin", null, 0), vm);
    }

    [Theory]
    [InlineData("memory = 12Q", "actorvmm.vm.memory")]
    [InlineData("memory = 100", "actorvmm.vm.memory")]
    [InlineData("cpus = 0", "actorvmm.vm.cpus")]
    [InlineData("cpus = 17", "actorvmm.vm.cpus")]
    [InlineData("cpus = two", "actorvmm.vm.cpus")]
    [InlineData("cpus = \"-1\"", "actorvmm.vm.cpus")]
    [InlineData("serial.input = tty", "actorvmm.vm.serial.input")]
    [InlineData("timeout = -1", "actorvmm.vm.timeout")]
    [InlineData("timeout = soon", "actorvmm.vm.timeout")]
    [InlineData("name = \"  \"", "actorvmm.vm.name")]
    [InlineData("cpu = \"host,-nosuchthing\"", "actorvmm.vm.cpu")]
    [InlineData("cpu = pentium", "actorvmm.vm.cpu")]
    [InlineData("test-devices = maybe", "actorvmm.vm.test-devices")]
    [InlineData("rng = maybe", "actorvmm.vm.rng")]
    [InlineData("rng = on, paging.enabled = on", "actorvmm.vm.rng")]
    [InlineData("devices { floppy { node = \"127.0.0.1:4712\" } }", "actorvmm.vm.devices.floppy")]
    [InlineData("devices { uart0 { node = \"127.0.0.1\" } }", "actorvmm.vm.devices.uart0.node")]
    [InlineData("devices { uart0 { node = \"127.0.0.1:70000\" } }", "actorvmm.vm.devices.uart0.node")]
    [InlineData("devices { uart0 { where = \"127.0.0.1:4712\" } }", "actorvmm.vm.devices.uart0.where")]
    [InlineData("devices { uart0 = \"127.0.0.1:4712\" }", "actorvmm.vm.devices.uart0")]
    [InlineData("devices = 3", "actorvmm.vm.devices")]
    public void Bad_values_are_config_exceptions_naming_the_key(string setting, string key)
    {
        var config = ConfigurationFactory.ParseString($"actorvmm.vm {{ {setting} }}").WithFallback(VmConfig.Load(null));
        var e = Assert.Throws<ConfigException>(() => VmConfig.From(config));
        Assert.Contains(key, e.Message);
    }

    [Fact]
    public void The_cpu_model_is_read_from_actorvmm_vm_cpu_and_defaults_to_host()
    {
        Assert.Same(ActorVmm.LibVmm.CpuModel.Host, VmConfig.From(VmConfig.Load(null)).Cpu);
        var config = ConfigurationFactory.ParseString("actorvmm.vm.cpu = \"host,-x2apic,-pcid\"").WithFallback(VmConfig.Load(null));
        Assert.Equal("host,-x2apic,-pcid", VmConfig.From(config).Cpu.ToString());
    }

    [Fact]
    public void A_key_without_a_value_is_a_config_exception_naming_the_key()
    {
        var config = ConfigurationFactory.ParseString("actorvmm.vm.memory = ").WithFallback(VmConfig.Load(null));
        var e = Assert.Throws<ConfigException>(() => VmConfig.From(config));
        Assert.Contains("actorvmm.vm.memory", e.Message);
    }

    [Fact]
    public void A_configuration_without_a_vm_section_is_refused()
    {
        var e = Assert.Throws<ConfigException>(() => VmConfig.From(ConfigurationFactory.ParseString("other = 1")));
        Assert.Contains("actorvmm.vm", e.Message);
    }

    [Fact]
    public void Load_refuses_a_missing_file()
    {
        using var dir = new TempDir();
        var e = Assert.Throws<ConfigException>(() => VmConfig.Load(dir.File("nope.conf")));
        Assert.Contains("does not exist", e.Message);
    }

    [Theory]
    [InlineData("actorvmm.vm { memory = ", "actorvmm.vm.memory has no value")]
    [InlineData("actorvmm.vm { name = x, serial { output = ", "actorvmm.vm.serial.output has no value")]
    [InlineData("actorvmm.vm.cpus =", "Unknown token")]
    public void Load_refuses_a_file_that_is_not_valid_hocon(string text, string detail)
    {
        using var dir = new TempDir();
        var file = dir.Write("bad.conf", text);
        var e = Assert.Throws<ConfigException>(() => VmConfig.Load(file));
        Assert.Contains("not valid HOCON", e.Message);
        Assert.Contains(file, e.Message);
        Assert.Contains(detail, e.Message);
    }

    [Fact]
    public void Load_accepts_an_empty_file_as_all_defaults()
    {
        using var dir = new TempDir();
        var vm = VmConfig.From(VmConfig.Load(dir.Write("empty.conf", "")));
        Assert.Equal("vm0", vm.Name);
    }

    [Theory]
    [InlineData("0x7C00", 0x7C00UL)]
    [InlineData("0X10", 0x10UL)]
    [InlineData("31744", 31744UL)]
    public void ParseNumber_reads_decimal_and_hex(string text, ulong value) =>
        Assert.Equal(value, Cli.ParseNumber(text, "--load-address"));

    [Theory]
    [InlineData("")]
    [InlineData("0x")]
    [InlineData("-5")]
    [InlineData("7C00")]
    public void ParseNumber_rejects_other_text(string text) =>
        Assert.Contains("--load-address", Assert.Throws<ConfigException>(() => Cli.ParseNumber(text, "--load-address")).Message);

    [Fact]
    public void ParseEntry_reads_hex_cs_ip()
    {
        Assert.Equal(((ushort)0x1000, (ushort)0x7C00), Cli.ParseEntry("1000:7C00"));
        Assert.Throws<ConfigException>(() => Cli.ParseEntry("zz"));
        Assert.Throws<ConfigException>(() => Cli.ParseEntry("10000:0"));
        Assert.Throws<ConfigException>(() => Cli.ParseEntry("0:0:0"));
    }

    [Fact]
    public void Test_devices_are_off_by_default()
    {
        Assert.False(VmConfig.From(VmConfig.Load(null)).TestDevices);
    }

    [Theory]
    [InlineData("on", true)]
    [InlineData("off", false)]
    public void The_entropy_device_follows_the_vm_setting_and_is_off_by_default(string value, bool on)
    {
        Assert.False(VmConfig.From(VmConfig.Load(null)).Rng);
        var config = ConfigurationFactory.ParseString($"actorvmm.vm.rng = {value}").WithFallback(VmConfig.Load(null));
        Assert.Equal(new VmConfig("vm0", 64 * MiB, 1, "stdout", "stdin", null, 0) { Rng = on }, VmConfig.From(config));
    }

    [Theory]
    [InlineData("on", true)]
    [InlineData("true", true)]
    [InlineData("off", false)]
    [InlineData("false", false)]
    public void Test_devices_follow_the_vm_setting(string value, bool on)
    {
        var config = ConfigurationFactory.ParseString($"actorvmm.vm.test-devices = {value}").WithFallback(VmConfig.Load(null));
        Assert.Equal(new VmConfig("vm0", 64 * MiB, 1, "stdout", "stdin", null, 0) { TestDevices = on }, VmConfig.From(config));
    }
}

public sealed class HaltPollConfigTests
{
    [Fact]
    public void Devices_on_other_nodes_are_named_with_their_node_and_none_by_default()
    {
        Assert.Empty(VmConfig.From(VmConfig.Load(null)).DeviceNodes);
        var config = ConfigValues.From([new("actorvmm.vm.devices.uart0.node", "127.0.0.1:4712")]).WithFallback(VmConfig.Load(null));
        Assert.Equal(new Dictionary<string, string> { ["uart0"] = "127.0.0.1:4712" }, VmConfig.From(config).DeviceNodes);
        // An empty node keeps the device beside its VM.
        var here = ConfigValues.From([new("actorvmm.vm.devices.uart0.node", "")]).WithFallback(VmConfig.Load(null));
        Assert.Empty(VmConfig.From(here).DeviceNodes);
    }

    private static Akka.Configuration.Config With(string value) =>
        ConfigurationFactory.ParseString($"actorvmm.vcpu.halt-poll = \"{value}\"").WithFallback(VmConfig.Load(null));

    [Theory]
    [InlineData("0", 0)]
    [InlineData("50us", 50)]
    [InlineData("50µs", 50)]
    [InlineData("0.2ms", 200)]
    [InlineData("1ms", 1000)]
    public void Halt_poll_accepts_off_and_durations_up_to_a_millisecond(string text, double microseconds)
    {
        Assert.Equal(TimeSpan.FromMicroseconds(microseconds), Vcpu.VcpuProtocol.HaltPoll(With(text)));
        VmConfig.From(With(text)); // and the VM's configuration takes it
    }

    [Fact]
    public void The_default_halt_poll_is_200us_in_both_defaults()
    {
        Assert.Equal(TimeSpan.FromMicroseconds(200), Vcpu.VcpuProtocol.HaltPoll(VmConfig.Load(null)));
        Assert.Equal(TimeSpan.FromMicroseconds(200),
            Vcpu.VcpuProtocol.HaltPoll(ConfigurationFactory.ParseString(Vcpu.VcpuProtocol.DefaultConfig)));
    }

    [Theory]
    [InlineData("2ms")]
    [InlineData("-5us")]
    [InlineData("fast")]
    [InlineData("50")]
    public void A_bad_halt_poll_is_refused_with_the_key_and_the_value(string text)
    {
        var e = Assert.Throws<ConfigException>(() => VmConfig.From(With(text)));
        Assert.Contains("actorvmm.vcpu.halt-poll", e.Message);
        Assert.Contains($"\"{text}\"", e.Message);
    }
}
