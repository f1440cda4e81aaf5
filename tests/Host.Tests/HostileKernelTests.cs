using System.Buffers.Binary;
using ActorVmm.Host.Boot;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// `run --kernel` with a broken or hostile file: thousands of seeded mutations of two valid
/// multiboot kernels (an ELF one, and a flat one placed by the header's address fields), each
/// recognised and loaded into guest RAM. Every one must load or be refused with a
/// <see cref="BootException"/> (the CLI's clear error); any other exception is a loader bug that
/// would reach the user as a crash. A failure names the seed that reproduces it.
/// </summary>
public sealed class HostileKernelTests
{
    private const uint KernelAddress = 0x10_0000;
    private const int Rounds = 3_000;

    private static byte[] ElfKernel()
    {
        var segment = new byte[12 + 64];
        TestElf.MultibootHeader().CopyTo(segment, 0);
        return TestElf.Build(segment, KernelAddress, KernelAddress + 12, bss: 0x100);
    }

    private static byte[] FlatKernel()
    {
        var file = new byte[64];
        TestElf.MultibootHeader(0b11u | MultibootImage.FlagAddressFields).CopyTo(file, 0);
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(12), 0x20_0000); // header_addr
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(16), 0x20_0000); // load_addr
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(20), 0);         // load_end_addr: whole file
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(24), 0x20_1000); // bss_end_addr
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(28), 0x20_0020); // entry
        return file;
    }

    /// <summary>Where the multiboot header starts in each kernel.</summary>
    private static int HeaderAt(byte[] kernel) => kernel.Length > TestElf.SegmentOffset && kernel[0] == 0x7F ? TestElf.SegmentOffset : 0;

    private static readonly uint[] Interesting = [0, 1, 2, 3, 0x20, 0x34, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0xFFF, 0x1000, KernelAddress, 0x100_0000];

    /// <summary>One hostile variant: ELF/program header bytes changed, multiboot fields changed
    /// with the checksum kept right (so the loader gets past the header), or the file cut short.</summary>
    private static byte[] Mutate(byte[] valid, Random r)
    {
        var k = (byte[])valid.Clone();
        var header = HeaderAt(k);
        for (int n = r.Next(1, 4), i = 0; i < n; i++)
        {
            switch (r.Next(4))
            {
                case 0 when Math.Min(header, k.Length) > 0: // a byte of the ELF or program header
                    k[r.Next(Math.Min(header, k.Length))] = r.Next(2) == 0 ? (byte)r.Next(256) : (byte)Interesting[r.Next(Interesting.Length)];
                    break;
                case 0 or 1: // a 32-bit field anywhere in the headers
                    var at = r.Next(Math.Max(1, Math.Min(k.Length, header + 32) - 3)) & ~3;
                    if (at + 4 <= k.Length) BinaryPrimitives.WriteUInt32LittleEndian(k.AsSpan(at), Interesting[r.Next(Interesting.Length)]);
                    break;
                case 2: // a multiboot field (flags or an address field), checksum fixed up
                    var field = header + 4 + 4 * r.Next(1 + 6);
                    if (field == header + 8) field += 4;
                    if (field + 4 > k.Length || header + 12 > k.Length) break;
                    BinaryPrimitives.WriteUInt32LittleEndian(k.AsSpan(field), r.Next(2) == 0 ? (uint)r.NextInt64(1L << 32) : Interesting[r.Next(Interesting.Length)]);
                    var flags = BinaryPrimitives.ReadUInt32LittleEndian(k.AsSpan(header + 4));
                    BinaryPrimitives.WriteUInt32LittleEndian(k.AsSpan(header + 8), unchecked(0u - 0x1BAD_B002u - flags));
                    break;
                default: // cut short
                    if (k.Length > 0) Array.Resize(ref k, r.Next(k.Length));
                    break;
            }
        }
        return k;
    }

    [Theory]
    [InlineData("elf")]
    [InlineData("flat")]
    public void A_mutated_kernel_loads_or_is_refused_with_a_boot_error_never_another_exception(string kind)
    {
        using var memory = VmspaceLayout.Build(16 << 20);
        var valid = kind == "elf" ? ElfKernel() : FlatKernel();
        KernelKind.Recognise(valid, "valid", "console=ttyS0", null).Load(memory); // the starting point loads

        int loaded = 0, refused = 0;
        var bugs = new List<string>();
        for (var seed = 0; seed < Rounds; seed++)
        {
            var kernel = Mutate(valid, new Random(seed));
            try
            {
                KernelKind.Recognise(kernel, "fuzz", "console=ttyS0", [1, 2, 3]).Load(memory);
                loaded++;
            }
            catch (BootException)
            {
                refused++;
            }
            catch (Exception e)
            {
                if (bugs.Count < 5) bugs.Add($"seed {seed}: {e.GetType().Name}: {e.Message}");
                else bugs.Add("");
            }
        }
        Assert.True(bugs.Count == 0, $"{bugs.Count} of {Rounds} mutated kernels crashed the loader: {string.Join("; ", bugs.Where(b => b.Length > 0))}");
        // Both outcomes happen: the mutations reach past the checks, and the checks refuse.
        Assert.True(loaded > Rounds / 20 && refused > Rounds / 20, $"{loaded} loaded, {refused} refused");
    }

    /// <summary>A bzImage with fields of its setup header (0x1F1-0x26B) set to random or boundary
    /// values, or cut short, loaded with a small initrd into 64 MiB.</summary>
    [Fact]
    public void A_mutated_bzimage_loads_or_is_refused_with_a_boot_error_never_another_exception()
    {
        using var memory = VmspaceLayout.Build(64 << 20);
        var valid = TestBzImage.Build();
        new LinuxImage(valid, "console=ttyS0", [1, 2, 3]).Load(memory); // the starting point loads

        int loaded = 0, refused = 0;
        var bugs = new List<string>();
        for (var seed = 0; seed < Rounds; seed++)
        {
            var r = new Random(seed);
            var k = (byte[])valid.Clone();
            for (int n = r.Next(1, 3), i = 0; i < n; i++)
            {
                var at = r.Next(0x1F1, 0x26C);
                if (at + 4 > k.Length) break; // already cut short
                switch (r.Next(5))
                {
                    case 0: k[at] = (byte)r.Next(256); break;
                    case 1 or 2 when at + 4 <= 0x26C: BinaryPrimitives.WriteUInt32LittleEndian(k.AsSpan(at), Interesting[r.Next(Interesting.Length)]); break;
                    case 3 when at + 4 <= 0x26C: BinaryPrimitives.WriteUInt32LittleEndian(k.AsSpan(at), (uint)r.NextInt64(1L << 32)); break;
                    default: Array.Resize(ref k, r.Next(k.Length)); break;
                }
            }
            try
            {
                KernelKind.Recognise(k, "fuzz", "console=ttyS0", [1, 2, 3]).Load(memory);
                loaded++;
            }
            catch (BootException)
            {
                refused++;
            }
            catch (Exception e)
            {
                if (bugs.Count < 5) bugs.Add($"seed {seed}: {e.GetType().Name}: {e.Message}");
                else bugs.Add("");
            }
        }
        Assert.True(bugs.Count == 0, $"{bugs.Count} of {Rounds} mutated bzImages crashed the loader: {string.Join("; ", bugs.Where(b => b.Length > 0))}");
        Assert.True(loaded > Rounds / 20 && refused > Rounds / 20, $"{loaded} loaded, {refused} refused");
    }
}
