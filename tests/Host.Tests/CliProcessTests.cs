using System.Diagnostics;

namespace ActorVmm.Host.Tests;

/// <summary>
/// `actorvmm` as a user runs it: a separate process, stdin closed, output captured. Every user
/// error must be a clear line on stderr and exit code 2, never a stack trace.
/// </summary>
public sealed class CliProcessTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private sealed record Result(int ExitCode, string Stdout, string Stderr)
    {
        public string[] ErrorLines => Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        public override string ToString() => $"exit {ExitCode}\n--- stdout ---\n{Stdout}\n--- stderr ---\n{Stderr}";
    }

    private static Task<Result> Run(params string[] args) => Run(new Dictionary<string, string>(), args);

    private static async Task<Result> Run(IReadOnlyDictionary<string, string> environment, params string[] args)
    {
        var dll = Path.Combine(AppContext.BaseDirectory, "actorvmm.dll");
        Assert.True(File.Exists(dll), $"{dll} is missing: the Host project output should be copied next to the tests");
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = AppContext.BaseDirectory,
        };
        foreach (var (name, value) in environment) start.Environment[name] = value;
        start.ArgumentList.Add(dll);
        foreach (var a in args) start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        process.StandardInput.Close();
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(Timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            Assert.Fail($"actorvmm {string.Join(' ', args)} did not exit within {Timeout.TotalSeconds} s");
        }
        return new Result(process.ExitCode, await stdout, await stderr);
    }

    /// <summary>Exit 2, a first stderr line "actorvmm: error: ..." containing <paramref name="expected"/>, no stack trace.</summary>
    private static void AssertUserError(Result r, params string[] expected)
    {
        Assert.True(r.ExitCode == 2, r.ToString());
        AssertNoStackTrace(r);
        Assert.True(r.ErrorLines.Length > 0, r.ToString());
        Assert.StartsWith("actorvmm: error: ", r.ErrorLines[0]);
        foreach (var e in expected) Assert.True(r.ErrorLines[0].Contains(e, StringComparison.Ordinal), $"expected \"{e}\" in the first line\n{r}");
        Assert.True(r.Stdout.Length == 0, "stdout is the guest console; errors go to stderr\n" + r);
    }

    private static void AssertNoStackTrace(Result r)
    {
        var all = r.Stdout + r.Stderr;
        Assert.False(all.Split('\n').Any(l => l.StartsWith("   at ", StringComparison.Ordinal)), "stack trace in the output\n" + r);
        Assert.False(all.Contains("Exception", StringComparison.Ordinal), "an exception leaked to the user\n" + r);
    }

    private string OneByteImage() => _dir.Write("one.bin", [0xF4]);

    [Fact]
    public async Task Run_writes_where_its_start_went_when_asked()
    {
        // The guest halts at once; without KVM the run ends at the VM's build, after the actor system came up.
        var r = await Run(new Dictionary<string, string> { [StartupTimes.Variable] = "1" }, "run", "--flat", OneByteImage());
        AssertNoStackTrace(r);
        var line = r.ErrorLines.Last();
        Assert.True(line.StartsWith(StartupTimes.LinePrefix, StringComparison.Ordinal), r.ToString());
        var at = line[StartupTimes.LinePrefix.Length..].Split(", ")
            .Select(m => m.Split(' '))
            .ToDictionary(m => string.Join(' ', m[..^2]), m => double.Parse(m[^2], System.Globalization.CultureInfo.InvariantCulture));
        string[] order = File.Exists("/dev/kvm")
            ? ["main", "config", "vm prepared", "vm built", "guest ended", "stopped"]
            : ["main", "config", "stopped"];
        foreach (var name in order.Append("actor system")) Assert.True(at.ContainsKey(name), $"no {name} in {line}");
        for (var i = 1; i < order.Length; i++) Assert.True(at[order[i - 1]] <= at[order[i]], $"{order[i - 1]} after {order[i]}: {line}");
        Assert.True(at["actor system"] <= at["stopped"], line);
        Assert.True(r.ExitCode == (File.Exists("/dev/kvm") ? 0 : 2), r.ToString());
    }

    [Fact]
    public async Task Run_writes_nothing_of_its_start_unless_asked()
    {
        var r = await Run("run", "--flat", OneByteImage());
        Assert.DoesNotContain(StartupTimes.LinePrefix, r.Stderr);
    }

    [Fact]
    public async Task Run_restore_of_a_missing_directory_says_there_is_no_snapshot()
    {
        AssertUserError(await Run("run", "--restore", _dir.File("nothing")), "cannot restore", "no snapshot at", "no such directory");
    }

    [Fact]
    public async Task Run_restore_of_a_directory_without_manifest_says_it_is_not_a_snapshot()
    {
        _dir.Write("memory.part", new byte[4096]);
        AssertUserError(await Run("run", "--restore", _dir.Path), "cannot restore", "is not a snapshot", "manifest.json");
    }

    [Fact]
    public async Task Run_restore_refuses_options_that_would_change_the_machine()
    {
        AssertUserError(await Run("run", "--restore", _dir.Path, "--memory", "64M", "--cpus", "2"),
            "--restore", "--memory, --cpus", "cannot change it");
    }

    [Fact]
    public async Task Run_restore_eager_without_restore_is_refused()
    {
        AssertUserError(await Run("run", "--flat", OneByteImage(), "--restore-eager"), "--restore-eager goes with --restore");
    }

    [Fact]
    public async Task Run_with_a_missing_disk_says_it_does_not_exist_before_the_vm_starts()
    {
        var disk = _dir.File("missing.img");
        AssertUserError(await Run("run", "--flat", OneByteImage(), "--disk", disk), $"disk {disk} does not exist");
    }

    [Fact]
    public async Task Run_with_a_write_protected_disk_without_ro_says_to_use_it_read_only()
    {
        var disk = _dir.Write("ro.img", new byte[4096]);
        File.SetUnixFileMode(disk, UnixFileMode.UserRead | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        AssertUserError(await Run("run", "--flat", OneByteImage(), "--disk", disk), $"disk {disk} is read-only", "--disk FILE,ro");
    }

    [Fact]
    public async Task Run_with_a_disk_option_without_a_file_is_refused()
    {
        AssertUserError(await Run("run", "--flat", OneByteImage(), "--disk", ",ro"), "--disk \",ro\": give FILE or FILE,ro");
    }

    [Fact]
    public async Task A_disk_from_the_vm_file_is_checked_too()
    {
        var disk = _dir.File("gone.img");
        var config = _dir.Write("vm.conf", $"actorvmm.vm.disk {{ path = \"{disk}\", read-only = on }}");
        AssertUserError(await Run("run", "--config", config, "--flat", OneByteImage()), $"disk {disk} does not exist");
    }

    [Fact]
    public async Task Run_with_missing_flat_image_says_it_does_not_exist()
    {
        AssertUserError(await Run("run", "--flat", "/does/not/exist"), "/does/not/exist", "does not exist");
    }

    [Fact]
    public async Task Run_with_a_directory_as_image_says_it_is_a_directory()
    {
        AssertUserError(await Run("run", "--flat", _dir.Path), "is a directory");
    }

    [Fact]
    public async Task Run_with_a_directory_as_firmware_says_it_is_a_directory()
    {
        AssertUserError(await Run("run", "--firmware", _dir.Path), "is a directory");
    }

    [Fact]
    public async Task Run_with_an_empty_image_says_it_is_empty()
    {
        AssertUserError(await Run("run", "--flat", _dir.Write("empty.bin", [])), "empty");
    }

    [Fact]
    public async Task Run_with_both_firmware_and_flat_is_refused()
    {
        var image = OneByteImage();
        AssertUserError(await Run("run", "--firmware", image, "--flat", image), "one of");
    }

    /// <summary>--test-devices reaches the VM: with it, a 16 MiB firmware image (right-aligned below
    /// 4 GiB, so down to 0xFF000000) would cover the test devices' MMIO RAM and is refused before
    /// anything is built; without it the same image gets past that check.</summary>
    [Fact]
    public async Task Test_devices_refuse_a_firmware_image_over_their_mmio_ram()
    {
        var firmware = _dir.Write("big.bin", new byte[16 << 20]);

        AssertUserError(await Run("run", "--test-devices", "--firmware", firmware), "test devices' MMIO RAM at 0xFF000000", "16320 KiB");
        var without = await Run("run", "--firmware", firmware, "--timeout", "1");
        AssertNoStackTrace(without);
        Assert.DoesNotContain("test devices", without.Stderr);
    }

    [Fact]
    public async Task A_kernel_that_is_elf_without_a_multiboot_header_is_refused()
    {
        var elf = _dir.Write("plain.elf", ActorVmm.Testing.TestElf.Build([0xF4], 0x10_0000, 0x10_0000));
        AssertUserError(await Run("run", "--kernel", elf), "without a multiboot header");
    }

    [Fact]
    public async Task A_malformed_multiboot_kernel_is_refused_before_kvm_is_needed()
    {
        // A valid header, but the ELF segment's file offset points past the end of the file.
        var kernel = ActorVmm.Testing.TestElf.Build([.. ActorVmm.Testing.TestElf.MultibootHeader(), 0xF4], 0x10_0000, 0x10_000C);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(kernel.AsSpan(ActorVmm.Testing.TestElf.HeaderSize + 4), 999_999);
        AssertUserError(await Run("run", "--kernel", _dir.Write("bad.elf", kernel)), "outside the file");
    }

    [Fact]
    public async Task A_bzimage_the_loader_cannot_enter_is_refused_naming_why()
    {
        var bz = TestBzImage.Build(new TestBzImage.Fields { Version = 0x0209 });
        AssertUserError(await Run("run", "--kernel", _dir.Write("bzImage", bz)), "boot protocol 2.09 is too old");
    }

    [Fact]
    public async Task The_kernel_its_initrd_and_its_command_line_can_come_from_the_vm_file()
    {
        // cmdline_size 12: the 13-byte command line of the VM file is refused when the image loads,
        // which happens before KVM is opened, so the refusal shows the file's values were used.
        var bz = _dir.Write("bzImage", TestBzImage.Build(new TestBzImage.Fields { CmdlineSize = 12 }));
        var initrd = _dir.Write("initrd", new byte[4096]);
        var conf = _dir.Write("vm.conf", $"actorvmm.vm.boot {{ kernel = \"{bz}\", initrd = \"{initrd}\", append = \"console=ttyS0\" }}");
        AssertUserError(await Run("run", "--config", conf), "the command line is 13 bytes; the kernel takes at most 12");
        AssertUserError(await Run("run", "--config", conf, "--append", "console=ttyS0,115200"), "the command line is 20 bytes");
        var noKernel = _dir.Write("initrd-only.conf", $"actorvmm.vm.boot.initrd = \"{initrd}\"");
        AssertUserError(await Run("run", "--config", noKernel), "go with --kernel");
    }

    [Fact]
    public async Task Initrd_without_a_kernel_is_refused()
    {
        AssertUserError(await Run("run", "--flat", OneByteImage(), "--initrd", OneByteImage()), "--kernel");
    }

    [Fact]
    public async Task A_lapic_mode_that_does_not_exist_is_refused()
    {
        AssertUserError(await Run("run", "--lapic", "kernel", "--flat", OneByteImage()), "actorvmm.vm.lapic", "emulated or assisted");
    }

    [Fact]
    public async Task Memory_that_is_not_a_size_is_refused()
    {
        AssertUserError(await Run("run", "--memory", "12Q", "--flat", OneByteImage()), "actorvmm.vm.memory", "not a size");
    }

    [Fact]
    public async Task Memory_that_is_not_a_multiple_of_4K_is_refused()
    {
        AssertUserError(await Run("run", "--memory", "100", "--flat", OneByteImage()), "not a multiple of 4 KiB");
    }

    [Fact]
    public async Task Memory_below_the_minimum_is_refused()
    {
        AssertUserError(await Run("run", "--memory", "512K", "--flat", OneByteImage()), "below the minimum");
    }

    [Fact]
    public async Task Too_many_cpus_are_refused()
    {
        AssertUserError(await Run("run", "--cpus", "99", "--flat", OneByteImage()), "actorvmm.vm.cpus", "1 to 16");
    }

    [Fact]
    public async Task A_config_file_with_invalid_hocon_is_refused_with_a_clear_line()
    {
        var conf = _dir.Write("bad.conf", "actorvmm.vm { memory = ");
        AssertUserError(await Run("run", "--config", conf, "--flat", OneByteImage()), conf, "not valid HOCON", "actorvmm.vm.memory");
    }

    [Fact]
    public async Task A_config_file_with_a_bad_value_names_the_key()
    {
        var conf = _dir.Write("cpus.conf", "actorvmm.vm { cpus = lots }");
        AssertUserError(await Run("run", "--config", conf, "--flat", OneByteImage()), "actorvmm.vm.cpus", "lots");
    }

    [Fact]
    public async Task A_missing_config_file_is_refused()
    {
        var conf = _dir.File("missing.conf");
        AssertUserError(await Run("run", "--config", conf, "--flat", OneByteImage()), conf, "does not exist");
    }

    [Fact]
    public async Task An_unknown_option_is_refused()
    {
        var r = await Run("run", "--bogus");
        AssertUserError(r, "--bogus");
        Assert.Contains("--help", r.Stderr);
    }

    [Fact]
    public async Task Run_with_nothing_to_boot_names_the_options()
    {
        AssertUserError(await Run("run"), "nothing to boot", "--firmware", "--flat");
    }

    [Fact]
    public async Task A_bad_entry_is_refused()
    {
        AssertUserError(await Run("run", "--flat", OneByteImage(), "--entry", "zz"), "--entry", "\"zz\"");
    }

    [Fact]
    public async Task A_bad_load_address_is_refused()
    {
        AssertUserError(await Run("run", "--flat", OneByteImage(), "--load-address", "0xZZ"), "--load-address", "not a number");
    }

    [Fact]
    public async Task Help_lists_the_commands()
    {
        var r = await Run("--help");
        Assert.True(r.ExitCode == 0, r.ToString());
        Assert.Contains("run", r.Stdout);
        Assert.Contains("demo", r.Stdout);
        AssertNoStackTrace(r);
    }

    [Fact]
    public async Task Demo_runs_the_guest_or_explains_that_kvm_is_missing()
    {
        var r = await Run("demo");
        AssertNoStackTrace(r);
        if (!File.Exists("/dev/kvm"))
        {
            Assert.True(r.ExitCode != 0, r.ToString());
            var errors = r.ErrorLines.Where(l => l.StartsWith("actorvmm: error:", StringComparison.Ordinal)).ToArray();
            Assert.True(errors.Length == 1, "exactly one error line expected\n" + r);
            Assert.Contains("/dev/kvm", errors[0]);
        }
        else
        {
            Assert.True(r.ExitCode == 0, r.ToString());
            Assert.Contains("Hello from an ActorVmm guest!", r.Stdout);
            Assert.Contains("message trace", r.Stdout);
        }
    }
}
